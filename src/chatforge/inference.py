"""Inference over a loaded bundle: the objects the serving engine drives.

No grpc here. The engine (``serving/engine.py``) only relies on the two protocols
below, so it can be tested with fakes and serves every family the same way.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from chatforge import runtime
from chatforge.bundle import Bundle, load_bundle, torch_class_probs
from chatforge.decoding import GenerationOptions, StepSpec, autocast_for, generate_stream
from chatforge.modules import onednn_linear_available, pack_linear_layers
from chatforge.modules.linear import pack_policy
from chatforge.predictions import ClassPrediction  # re-exported; defined torch-free for the client

__all__ = [  # autocast_for, torch_class_probs, ClassPrediction: re-exported from where they live
    "PRECISIONS",
    "ClassPrediction",
    "Classifier",
    "ModelInfo",
    "ReplyGenerator",
    "Seq2SeqGenerator",
    "TextClassifier",
    "TokenDelta",
    "autocast_for",
    "check_precision",
    "full_range_activations",
    "load_model",
    "quantize_int8",
    "resolve_precision",
    "torch_class_probs",
]

logger = logging.getLogger(__name__)

# Serving precisions. bf16 casts a torch model's weights once at load and runs it under bf16
# autocast, which casts any fp32 activation or buffer a family mixes in for the matmuls (on CUDA
# it also keeps norms and softmax in fp32; CPU kernels accumulate bf16 norms in fp32). On CPUs
# with AMX or AVX512-BF16, and on GPUs, matmuls run several times faster; the numbers move by
# bf16 rounding only (tests/test_inference_precision.py).
# int8 replaces the linear layers (and ELMo's unprojected LSTMs) by dynamically quantized ones
# (:func:`quantize_int8`); auto picks one of the others from the CPU's flags (chatforge.runtime).
PRECISIONS = ("fp32", "bf16", "int8", "auto")

# int8 must cover most of a model's matmul weights to pay for quantizing its activations each call;
# below this share it is refused (ELMo with projected LSTMs; a model made mostly of convolutions).
INT8_MIN_COVERAGE = 0.5


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    return precision


def _int8_plan(model: torch.nn.Module) -> tuple[dict[str, object], float]:
    """(qconfig per module name to quantize, share of the matmul weights they hold).

    Linear layers, and LSTMs without a projection (torch's quantized LSTM has no ``proj_size``).
    Embeddings stay fp32: a lookup reads one row per token, so int8 saves no arithmetic, and the
    rows would come back through a dequantization per call; a weight tied to an output layer is
    quantized as that layer's copy. Convolutions stay fp32 (dynamic quantization has none).
    """
    # Per output channel: one scale per row of each weight, not one per matrix. On ChatbotData's 559 test
    # questions (chatbot_kr_transformer.yaml, 10 epochs) greedy int8 replies agreed with fp32 on 90.6 % of
    # token positions against 87.7 % per tensor (benchmarks/int8_quality.py; docs/results/serving-precision.md).
    from torch.ao.quantization import per_channel_dynamic_qconfig

    spec: dict[str, object] = {}
    covered, total, seen = 0, 0, set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        quantize = isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.LSTM) and module.proj_size == 0)
        for p in module.parameters(recurse=False):
            if p.dim() < 2 or (id(p) in seen and not quantize):
                continue
            seen.add(id(p))
            total += p.numel()
            covered += p.numel() if quantize else 0
        if quantize:
            spec[name] = per_channel_dynamic_qconfig
    return spec, covered / total if total else 0.0


def linear_width(model: torch.nn.Module) -> int | None:
    """The median input width of ``model``'s linear layers (its d_model, for the families here)."""
    widths = sorted(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    return widths[len(widths) // 2] if widths else None


def _full_range_linear_class() -> type:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    class FullRangeDynamicLinear(DynamicLinear):
        """torch's dynamic int8 linear layer with its activations quantized to all 8 bits (0-255 with the call's own
        scale and zero point) instead of 7: ``DynamicQuantizedLinear.forward`` always passes ``reduce_range=True``,
        which guards CPUs whose u8 x s8 kernels add pairs of products in 16-bit lanes (and can saturate). With int8 dot
        products (VNNI, AMX) the products are added in 32 bits, so the eighth bit is free precision."""

        reduce_range = False  # read by chatforge.modules.scripted.int8_reduce_range

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
            return y.to(x.dtype)

        def _get_name(self) -> str:
            return "DynamicQuantizedLinear(full range)"

    return FullRangeDynamicLinear


_FULL_RANGE_LINEAR: type | None = None


def full_range_activations(model: torch.nn.Module, flags: set[str] | None = None) -> int:
    """Give ``model``'s dynamically quantized int8 linear layers 8-bit activations where this CPU (or one with
    ``flags``) has int8 dot products (:func:`chatforge.runtime.int8_dot_products`); returns how many layers changed
    (0 elsewhere: there torch's 7-bit activations stay). On ChatbotData's test questions (a 10-epoch
    ``chatbot_kr_transformer.yaml`` run) greedy int8 replies agreed with fp32 on 89.3 % of tokens against 83.5 % with 7
    bits (docs/results/serving-precision.md)."""
    global _FULL_RANGE_LINEAR
    if not runtime.int8_dot_products(flags):
        return 0
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if _FULL_RANGE_LINEAR is None:
        _FULL_RANGE_LINEAR = _full_range_linear_class()
    changed = 0
    for module in model.modules():
        if type(module) is DynamicLinear and module._packed_params.dtype == torch.qint8:
            module.__class__ = _FULL_RANGE_LINEAR
            changed += 1
    return changed


def quantize_int8(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """Dynamically quantize ``model``'s linear layers to int8 in place (``torch.ao.quantization``):
    weights int8 per output channel, activations quantized per call from their observed range (8 bits on CPUs with
    int8 dot products, torch's 7 elsewhere: :func:`full_range_activations`), int32 accumulation, fp32 out; everything
    else (embeddings, norms, attention softmax) stays fp32.

    The kernels are those of torch's ``x86`` quantized engine (its default on x86): it runs dynamic
    linear layers on FBGEMM (AVX2/AVX512, VNNI where present). On the Xeon with AMX here a 256-1024-256-8000
    stack at batch 1, the decoding case, took 177 us on ``x86``, 180 us on ``fbgemm`` and 223 us on ``onednn``
    (427 us fp32); ``onednn`` (AMX int8) was faster only at batch 32. Raises ValueError for a family whose
    matmuls are mostly outside linear layers.
    """
    spec, coverage = _int8_plan(model)
    if coverage < INT8_MIN_COVERAGE:
        allowed = ", ".join(p for p in PRECISIONS if p != "int8")
        raise ValueError(f"precision int8 does not apply to family {family!r}: its linear layers hold "
                         f"{coverage:.0%} of its matmul weights (dynamic quantization covers linear layers and LSTMs "
                         f"without a projection, not convolutions or projected LSTMs); allowed for {family}: {allowed}")
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        # torch >= 2.10 marks torch.ao.quantization deprecated in favour of torchao, which is not a
        # dependency here; the eager dynamic path still works and is what this uses.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        torch.ao.quantization.quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=True)
    full = full_range_activations(model)
    logger.info("quantized %d layers of %s to int8 (%.0f%% of its matmul weights; engine %s; activations %s)",
                len(spec), family, 100 * coverage, torch.backends.quantized.engine,
                f"8-bit in {full} linear layers (int8 dot products)" if full else "7-bit (no int8 dot products)")
    return model


def resolve_precision(precision: str, bundle: Bundle | None = None) -> str:
    """``auto`` -> the precision :func:`chatforge.runtime.pick_precision` picks for this CPU (and a
    bundle's family: int8 only where it applies); any other name is returned checked."""
    check_precision(precision)
    if precision != "auto":
        return precision
    model = bundle.model if bundle is not None and isinstance(bundle.model, torch.nn.Module) else None
    int8_ok = model is None or _int8_plan(model)[1] >= INT8_MIN_COVERAGE
    picked, reason = runtime.auto_precision(int8_ok, linear_width(model) if model is not None else None)
    logger.info("precision auto -> %s (%s)%s", picked, reason,
                f" for {bundle.family}" if bundle is not None else "")
    return picked


@dataclass
class TokenDelta:
    """One generated token and the text it adds to the reply so far (may be "")."""

    token_id: int
    text: str


@dataclass
class ModelInfo:
    name: str
    family: str
    task: str
    version: str = "1"
    metadata: dict = field(default_factory=dict)


@runtime_checkable
class ReplyGenerator(Protocol):
    info: ModelInfo
    max_input_tokens: int

    def count_tokens(self, text: str) -> int: ...

    def stream(self, text: str, options: GenerationOptions) -> Iterator[TokenDelta]:
        """Yield tokens as they are produced; stop at </s> or options.max_new_tokens."""
        ...


@runtime_checkable
class TextClassifier(Protocol):
    info: ModelInfo
    max_input_tokens: int

    def count_tokens(self, text: str) -> int: ...

    def classify(self, texts: list[str]) -> list[ClassPrediction]: ...


class Seq2SeqGenerator:
    """Streams replies from a generation bundle (any family with the decoding cache interface)."""

    def __init__(self, bundle, name: str, version: str = "1"):
        self.bundle = bundle
        self.tok = bundle.tokenizer
        self.model = bundle.model
        self.max_input_tokens = bundle.config.train.max_source_len
        # A decoder-only model shares its positions between prompt and reply (GPT): a longer prompt would
        # leave no room for a token, so it is refused at the edge (INVALID_ARGUMENT) rather than failing mid-batch.
        room = getattr(self.model, "max_prompt_tokens", None)
        if room is not None and room < self.max_input_tokens:
            self.max_input_tokens = max(1, room)
        # Earlier turns the model was trained to read before the message (data.context_turns; 0: none).
        self.context_turns = bundle.config.data.context_turns
        self.info = ModelInfo(name=name, family=bundle.family, task=bundle.task, version=version,
                              metadata={**bundle.metadata, "context_turns": str(self.context_turns)})

    def count_tokens(self, text: str) -> int:
        return len(self.tok.encode(text))

    def encode_prompt(self, text: str, context: Sequence[str] = ()) -> tuple[list[int], int]:
        """The model's input ids for ``text`` after the conversation's earlier turns, and how many turns it
        holds: as in training (``chatforge.tasks.source_ids``), the latest whole turns that fit the input."""
        return self.tok.encode_with_context(text, context, max_turns=self.context_turns,
                                            budget=self.max_input_tokens)

    def stream(self, text: str, options: GenerationOptions, context: Sequence[str] = ()) -> Iterator[TokenDelta]:
        ids = self.encode_prompt(text, context)[0][: self.max_input_tokens] or [self.tok.unk_id]
        detok = self.tok.incremental_decoder()
        # Autocast around each resumption: the consumer may resume the generator from any thread.
        with autocast_for(self.model):
            steps = generate_stream(self.model, ids, options, bos_id=self.tok.bos_id, eos_id=self.tok.eos_id)
        while True:
            with autocast_for(self.model):
                token_id = next(steps, None)
            if token_id is None:
                return
            yield TokenDelta(token_id=token_id, text=detok.feed(token_id))

    def step_spec(self) -> StepSpec | None:
        """The row-wise step model continuous batching drives (``chatforge.decoding.StepModel``), or None
        when the family registers none (``FamilySpec.step_model``)."""
        make_step = self.bundle.config.model.spec.step_model
        if make_step is None:
            return None
        return StepSpec(model=make_step(self.model), encode=self.tok.encode,
                        new_detokenizer=self.tok.incremental_decoder, bos_id=self.tok.bos_id,
                        eos_id=self.tok.eos_id, unk_id=self.tok.unk_id, drafts=self.bundle.drafts)


ESTIMATOR_MAX_WORDS = 4096  # estimators have no context window; this only bounds request size


class Classifier:
    """Scores texts with a classification bundle (torch model or estimator); returns every label's
    probability, and applies the bundle's out-of-scope policy (``chatforge.oos``)."""

    def __init__(self, bundle: Bundle, name: str, version: str = "1"):
        self.bundle = bundle
        self.tok = bundle.tokenizer
        self.model = bundle.model
        self.labels: list[str] = list(bundle.labels or [])
        self.is_estimator = bundle.is_estimator
        self.max_input_tokens = ESTIMATOR_MAX_WORDS if self.is_estimator else bundle.config.train.max_source_len
        self.oos = bundle.oos  # the bundle's one oos policy (chatforge.oos), also what evaluation applies
        self.info = ModelInfo(name=name, family=bundle.family, task=bundle.task, version=version,
                              metadata=dict(bundle.metadata))

    def count_tokens(self, text: str) -> int:
        if self.is_estimator:
            return len(text.split())  # estimators featurise words and characters, not sentencepieces
        return len(self.tok.encode(text))

    def predict_proba(self, texts: list[str]):
        """(N, C) probabilities, columns in ``self.labels`` order."""
        return self.bundle.predict_proba(list(texts))

    def predict_views(self, texts: list[str]) -> list:
        """``[probabilities]``, plus one view per kind of member for an ensemble (the oos scorer reads them)."""
        if self.is_estimator and hasattr(self.model, "predict_views"):
            return self.model.predict_views(list(texts))
        return [self.predict_proba(texts)]

    def classify(self, texts: list[str]) -> list[ClassPrediction]:
        """One prediction per text with the oos policy's decision applied: ``out_of_scope`` (and ``label`` =
        the policy's oos label) is the bundle's answer, which a pipeline can act on without a threshold
        of its own."""
        if self.oos.needs_views:
            views = self.predict_views(texts)
            probs = views[0]
        else:
            probs, views = self.predict_proba(texts), None
        preds = self.oos.decide(probs, self.labels, texts, views)
        out = []
        for row, label in zip(probs.tolist(), preds, strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            out.append(ClassPrediction(label=label, score=row[best],
                                       scores=dict(zip(self.labels, row, strict=True)),
                                       out_of_scope=label == self.oos.label))
        return out


class ReplySelector:
    """Serves a selection bundle (``model.family: retrieval``): the best answer of its pool and its score."""

    def __init__(self, bundle: Bundle, name: str, version: str = "1"):
        self.bundle = bundle
        self.model = bundle.model
        self.info = ModelInfo(name=name, family=bundle.family, task=bundle.task, version=version,
                              metadata=dict(bundle.metadata))
        # Built here, where the bundle loads (off the event loop), so that the first guarded message does not
        # count 10,000 training questions on the loop (the policy calls familiarity() there: microseconds), and the
        # first select does not pay for the ranker's reverse-neighbour tables.
        self.model.warm()
        self._familiarity = self.model.familiarity_model()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    def select(self, text: str) -> tuple[str, float]:
        return self.model.reply(text)

    def familiarity(self, text: str) -> float:
        """How much ``text`` looks like the questions the model was trained on (mean log-probability per character,
        < 0; see ``baselines.retrieval.familiarity``): the reply policy's ``min_familiarity`` guard."""
        return self._familiarity.score(text)


# Bundle tasks served as reply generators (lm: a decoder-only model continuing the text, GPT). Their decode steps
# are the one-row calls that PackPolicy.one_row_transposed speeds up; other models never make one.
GENERATING_BUNDLE_TASKS = ("generation", "lm")


def load_model(bundle_dir, name: str, version: str = "1", precision: str = "fp32") -> ReplyGenerator | TextClassifier:
    """Load a bundle and wrap it for serving by its task.

    ``precision="bf16"`` casts a torch model's weights to bfloat16, ``"int8"`` quantizes its linear
    layers (:func:`quantize_int8`), ``"auto"`` picks one for this CPU (:func:`resolve_precision`; see
    :data:`PRECISIONS`); estimator bundles (XGBoost, linear, ensembles of them) are served as they are.
    """
    check_precision(precision)
    bundle = load_bundle(bundle_dir)
    precision = resolve_precision(precision, bundle)
    if precision != "fp32":
        if isinstance(bundle.model, torch.nn.Module):
            if precision == "bf16":
                bundle.model.to(torch.bfloat16)
            else:
                quantize_int8(bundle.model, bundle.family)
            bundle.metadata = {**bundle.metadata, "precision": precision}
        else:
            logger.info("precision %s does not apply to %s (%s bundle); serving it as it is",
                        precision, name, bundle.family)
    elif isinstance(bundle.model, torch.nn.Module):
        kernels, why = runtime.fp32_linear_kernels()
        if kernels == "onednn":
            policy = pack_policy(runtime.read_cpu_flags()[1])
            if bundle.task not in GENERATING_BUNDLE_TASKS:  # no one-row calls: no transposed copies to hold
                policy = policy._replace(one_row_transposed=False)
            n = pack_linear_layers(bundle.model, policy=policy)
            if n:
                bundle.metadata = {**bundle.metadata, "fp32_linear": "onednn"}
            if n:
                used = f"oneDNN ({policy.name}: calls from {policy.min_macs:,} multiply-adds" + (
                    f", of at most {policy.max_rows} rows)" if policy.max_rows is not None else ")")
                copies = sum(1 for m in bundle.model.modules() if hasattr(m, "transposed"))
                if copies:
                    used += f"; one-row calls of {copies} layers on a transposed copy of their weights"
            elif onednn_linear_available():  # a small model: no layer's matmul pays for oneDNN's call
                used = (f"torch's (no linear layer has the {policy.min_weights:,} weights that pay for oneDNN's "
                        "call)")
            else:
                used = "torch's (oneDNN's op unavailable in this torch build)"
            logger.info("fp32 linear layers of %s: %s (%d packed; %s)", name, used, n, why)
    # fp32 and int8 generators decode with a scripted step (bf16 ones eagerly: its scriptable() says why), built after
    # the layers took their final form (packed, or quantized).
    scripted = getattr(bundle.model, "use_scripted_step", None)
    if scripted is not None and bundle.task in GENERATING_BUNDLE_TASKS:
        from chatforge.modules.scripted import DECODE_STEP_ENV, decode_step_mode

        why_not = scripted() if decode_step_mode() == "auto" else f"{DECODE_STEP_ENV}=eager"
        if why_not is None:
            logger.info("decoding steps of %s: one TorchScript call each (the GIL given up for the whole step)",
                        name)
        else:
            logger.info("decoding steps of %s: eager (no scripted step: %s)", name, why_not)
    if bundle.task in GENERATING_BUNDLE_TASKS:
        return Seq2SeqGenerator(bundle, name, version)
    if bundle.task == "classification":
        return Classifier(bundle, name, version)
    if bundle.task == "selection":
        return ReplySelector(bundle, name, version)
    raise ValueError(f"bundle {bundle_dir} has task {bundle.task!r}, which chatforge cannot serve")
