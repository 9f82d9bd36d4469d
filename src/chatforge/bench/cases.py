"""The cases of ``chatforge bench``: chatforge and each anchor on identical weights and inputs.

Every case returns a :class:`Case`: its engines (``role`` chatforge or anchor), one row per measured
figure, the chatforge/anchor ratios and what the engines agree on. An anchor that is not installed is
listed as a skipped engine with the reason; a case with no anchor left is skipped as a whole.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatforge.bench.gpt_hf import (
    gpt_train_flops_per_token,
    greedy_fn,
    train_steps_fn,
    training_linear_kernels,
)
from chatforge.bench.timing import interleaved, matmul_peak_flops
from chatforge.bench.weights import (
    AnchorMissing,
    BertWeights,
    GPTWeights,
    Seq2SeqWeights,
    bert_weights,
    gpt_weights,
    need,
    transformer_classifier_weights,
    transformer_weights,
)
from chatforge.runtime import native_bf16

logger = logging.getLogger(__name__)

Step = Callable[[str], None]  # progress: a short description of what is being measured now

# Training runs in these (int8 is an inference precision only).
TRAIN_PRECISIONS = ("fp32", "bf16")
# Why bf16 engines are skipped on a CPU without native bf16 matmuls: their figures would time oneDNN's emulation
# (a bf16 training step 10-28x fp32's on an AMD EPYC with AVX2 only, benchmarks/train_precision.py).
EMULATED_BF16 = ("bf16 is emulated on this CPU (no amx_bf16 or avx512_bf16): many times slower than fp32, "
                 "so neither chatforge nor an anchor is timed in it here")


@dataclass(frozen=True)
class Sizes:
    """Model and workload sizes of one run (``SMOKE`` or ``FULL``)."""

    gpt_layers: int
    gpt_d_model: int
    gpt_heads: int
    vocab: int
    positions: int
    prompt_len: int
    new_tokens: int
    gen_batches: tuple[int, ...]
    bert_layers: int
    bert_d_model: int
    bert_heads: int
    cls_seq_len: int
    cls_calls: int  # forward calls per timed repetition
    num_labels: int
    train_batch: int
    train_seq_len: int
    train_steps: int
    matmul_n: int
    tokenizer_vocab: int
    tokenizer_copies: int  # the sample corpus repeated this many times
    scaling_batches: tuple[int, ...] = (1, 2, 4)
    scaling_prompt_lens: tuple[int, ...] = (4, 16)
    scaling_widths: tuple[int, ...] = (16, 32)
    scaling_new_tokens: int = 4
    init_std: float = 0.2  # random weights far from uniform, so greedy argmaxes are not near-ties
    # The Transformer encoder-decoder of the seq2seq case (layers each side; prompts, new tokens, batches
    # and vocabulary are the generation case's).
    s2s_layers: int = 2
    s2s_d_model: int = 32
    s2s_heads: int = 2
    s2s_d_ff: int = 64


SMOKE = Sizes(gpt_layers=2, gpt_d_model=32, gpt_heads=2, vocab=256, positions=64, prompt_len=8, new_tokens=4,
              gen_batches=(1, 8, 32), bert_layers=2, bert_d_model=32, bert_heads=2, cls_seq_len=16, cls_calls=2,
              num_labels=8, train_batch=2, train_seq_len=16, train_steps=1, matmul_n=128, tokenizer_vocab=600,
              tokenizer_copies=1)
# The 4-layer d256 GPT-2 with an 8000-word vocabulary of the earlier measurement (issue 16).
FULL = Sizes(gpt_layers=4, gpt_d_model=256, gpt_heads=4, vocab=8000, positions=256, prompt_len=16, new_tokens=64,
             gen_batches=(1, 8, 32), bert_layers=4, bert_d_model=256, bert_heads=4, cls_seq_len=64, cls_calls=20,
             num_labels=8, train_batch=8, train_seq_len=128, train_steps=3, matmul_n=2048, tokenizer_vocab=1000,
             tokenizer_copies=20, scaling_batches=(1, 2, 4, 8, 16, 32, 64), scaling_prompt_lens=(16, 64, 128, 192),
             scaling_widths=(64, 128, 256, 512), scaling_new_tokens=32,
             # chatforge's default Transformer: 3 + 3 post-LN layers, d256, 4 heads, d_ff 1024, relu, tied.
             s2s_layers=3, s2s_d_model=256, s2s_heads=4, s2s_d_ff=1024)


@dataclass
class Case:
    name: str
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    agreement: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    same_precision_ratios: bool = False  # training: fp32 against fp32 and bf16 against bf16 only

    def engine(self, name: str, role: str, library: str, precision: str, status: str = "ok",
               reason: str | None = None) -> None:
        self.engines[name] = {"role": role, "library": library, "precision": precision, "status": status,
                              "reason": reason}

    def add(self, metric: str, unit: str, higher_is_better: bool, batch: int | None,
            times: dict[str, list[float]], work: float) -> None:
        """One row per engine: ``work / median time`` (a rate) or ``median time / work`` (a time per unit,
        in ``unit``'s scale: ms), with every repetition's seconds kept."""
        for name, ts in times.items():
            med = statistics.median(ts)
            value = work / med if higher_is_better else med / work * 1e3
            self.rows.append({"metric": metric, "unit": unit, "higher_is_better": higher_is_better, "batch": batch,
                              "engine": name, "value": round(value, 3), "times_s": [round(t, 6) for t in ts]})

    def compute_ratios(self) -> None:
        """chatforge engine vs anchor engine per (metric, batch): > 1 means chatforge is faster (a rate
        over the anchor's, or the anchor's time over chatforge's)."""
        roles = {n: e["role"] for n, e in self.engines.items() if e["status"] == "ok"}
        keyed: dict[tuple, dict[str, dict]] = {}
        for r in self.rows:
            keyed.setdefault((r["metric"], r["batch"]), {})[r["engine"]] = r
        for (metric, batch), by_engine in keyed.items():
            for cf, cr in by_engine.items():
                if roles.get(cf) != "chatforge":
                    continue
                for an, ar in by_engine.items():
                    if roles.get(an) != "anchor" or not ar["value"] or not cr["value"]:
                        continue
                    if self.same_precision_ratios and (self.engines[an]["precision"]
                                                       != self.engines[cf]["precision"]):
                        continue
                    ratio = cr["value"] / ar["value"] if cr["higher_is_better"] else ar["value"] / cr["value"]
                    self.ratios.append({"metric": metric, "batch": batch, "chatforge": cf, "anchor": an,
                                        "ratio": round(ratio, 3)})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Assets:
    """Weights built once per run in ``work`` and shared by the cases that need them."""

    def __init__(self, work: Path, sizes: Sizes):
        self.work, self.sizes = work, sizes
        self._gpt: GPTWeights | None = None
        self._bert: BertWeights | None = None
        self._s2s: Seq2SeqWeights | None = None

    def gpt(self) -> GPTWeights:
        if self._gpt is None:
            s = self.sizes
            self._gpt = gpt_weights(self.work, vocab=s.vocab, layers=s.gpt_layers, d_model=s.gpt_d_model,
                                    heads=s.gpt_heads, positions=s.positions, init_std=s.init_std)
        return self._gpt

    def seq2seq(self) -> Seq2SeqWeights:
        if self._s2s is None:
            s = self.sizes
            self._s2s = transformer_weights(self.work, vocab=s.vocab, layers=s.s2s_layers, d_model=s.s2s_d_model,
                                            heads=s.s2s_heads, d_ff=s.s2s_d_ff, max_len=s.positions)
        return self._s2s

    def bert(self) -> BertWeights:
        if self._bert is None:
            s = self.sizes
            self._bert = bert_weights(self.work, vocab=s.vocab, layers=s.bert_layers, d_model=s.bert_d_model,
                                      heads=s.bert_heads, max_len=max(64, s.cls_seq_len),
                                      labels=[f"label{i}" for i in range(s.num_labels)], init_std=s.init_std)
        return self._bert


# Names in PRECISIONS that choose among the others rather than being one (measuring them would repeat one).
_RULES = ("auto",)


def _chatforge_precisions() -> tuple[str, ...]:
    # Read at run time: a precision added to serving (e.g. int8) is benchmarked without a change here.
    from chatforge import inference

    return tuple(p for p in inference.PRECISIONS if p not in _RULES)


def _chatforge_models(bundle: Path, case: Case, prefix: str = "chatforge-") -> dict[str, torch.nn.Module]:
    """The bundle's model as ``load_model`` prepares it for each serving precision (engines named
    ``prefix + precision``); a precision the model refuses (ValueError, e.g. int8 for a family it does not
    apply to) is a skipped engine, not a failure."""
    models = {}
    for p in _chatforge_precisions():
        if p == "bf16" and not native_bf16():
            case.engine(f"{prefix}{p}", "chatforge", "chatforge", p, "skipped", EMULATED_BF16)
            continue
        try:
            models[p] = _load_chatforge(bundle, p).model
        except ValueError as e:
            case.engine(f"{prefix}{p}", "chatforge", "chatforge", p, "skipped", str(e))
            continue
        case.engine(f"{prefix}{p}", "chatforge", "chatforge", p)
    return models


def _load_chatforge(bundle: Path, precision: str):
    from chatforge.inference import load_model

    return load_model(bundle, "bench", precision=precision)


def _random_ids(rows: int, cols: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(7, vocab, (rows, cols), generator=g)  # 0-6 are the special tokens


# ----------------------------------------------------------------------------------------- generation
def generation(assets: Assets, threads: int, repeats: int, step: Step) -> Case:
    s = assets.sizes
    case = Case("generation", config={
        "model": f"GPT-2, {s.gpt_layers} layers, d_model {s.gpt_d_model}, {s.gpt_heads} heads, vocab {s.vocab}",
        "prompt_len": s.prompt_len, "new_tokens": s.new_tokens, "batches": list(s.gen_batches),
        "decoding": "greedy, exactly new_tokens tokens (min = max)", "repeats": repeats,
        "weights": f"random (init_std {s.init_std:g}), chatforge bundle -> to-hf -> CTranslate2 "
                   "TransformersConverter"})
    step("generation: building weights, to-hf, CTranslate2 conversion")
    w = assets.gpt()
    from transformers import AutoModelForCausalLM


    makers = _chatforge_greedy(w.bundle, case)
    hf = AutoModelForCausalLM.from_pretrained(str(w.hf)).eval()
    case.engine("hf-fp32", "anchor", "transformers", "fp32")
    makers["hf-fp32"] = lambda x, n, out: greedy_fn(hf, True, x, n, "fp32", out=out, **_IDS)
    if _ct2_engines(case, w.ct2):
        import ctranslate2

        for q, path in w.ct2.items():
            gen = ctranslate2.Generator(str(path), device="cpu", compute_type=q, intra_threads=threads,
                                        inter_threads=1)
            makers[f"ct2-{q}"] = (lambda g: lambda x, n, out: _ct2_fn(g, w.vocab, x, n, out))(gen)
    _greedy_batches(case, makers, s, repeats, step, seed=0)
    return case


_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2}
Maker = Callable[[torch.Tensor, int, list], Callable[[], None]]


def _chatforge_greedy(bundle: Path, case: Case) -> dict[str, Maker]:
    """chatforge's greedy decoding of ``bundle`` at each serving precision (``chatforge-<precision>``)."""
    from chatforge.decoding import autocast_for

    return {f"chatforge-{p}": (lambda m: lambda x, n, out: greedy_fn(
        m, False, x, n, "fp32", out=out, context=lambda: autocast_for(m), **_IDS))(model)
        for p, model in _chatforge_models(bundle, case).items()}


def _ct2_engines(case: Case, ct2: dict[str, Path] | None) -> bool:
    """Register the CTranslate2 float32/int8 engines; False (both skipped, with the reason) when it is absent."""
    for q in ("float32", "int8"):
        if ct2 is None:
            case.engine(f"ct2-{q}", "anchor", "ctranslate2", q, "skipped",
                        "ctranslate2 is not installed; pip install 'chatforge[bench]'")
        else:
            case.engine(f"ct2-{q}", "anchor", "ctranslate2", q)
    return ct2 is not None


def _greedy_batches(case: Case, makers: dict[str, Maker], s: Sizes, repeats: int, step: Step, seed: int,
                    decode: Callable[[str, list], list] | None = None) -> None:
    """Time every engine's greedy decoding at each batch size (tokens/s, then time to first token) on the same
    random prompts, and record which engines' tokens equal chatforge fp32's. ``decode(engine, rows)`` maps an
    engine's output rows to ids (after timing) where it answers otherwise."""
    outputs: dict[int, dict[str, list]] = {}
    for b in s.gen_batches:
        prompts = _random_ids(b, s.prompt_len, s.vocab, seed=seed + b)
        outs: dict[str, list] = {name: [] for name in makers}
        step(f"{case.name}: batch {b}, {s.new_tokens} tokens")
        times = interleaved({n: mk(prompts, s.new_tokens, outs[n]) for n, mk in makers.items()}, repeats)
        case.add("tokens/s", "tokens/s", True, b, times, b * s.new_tokens)
        outputs[b] = {n: decode(n, rows) if decode else rows for n, rows in outs.items()}
        step(f"{case.name}: batch {b}, time to first token")
        times = interleaved({n: mk(prompts, 1, []) for n, mk in makers.items()}, repeats * 3)
        case.add("time to first token", "ms", False, b, times, 1)
    case.agreement = _agreement(outputs, "chatforge-fp32", fp32_anchors=("hf-fp32", "ct2-float32"))
    # A random model can settle into repeating one token; agreement on such output would say little.
    case.agreement["distinct_tokens"] = len({t for outs in outputs.values()
                                             for row in outs.get("chatforge-fp32", []) for t in row})


def _ct2_fn(gen, vocab: list[str], prompts: torch.Tensor, n: int, out: list) -> Callable[[], None]:
    tokens = [[vocab[i] for i in row] for row in prompts.tolist()]

    def run():
        res = gen.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=1,
                                 include_prompt_in_result=False)
        out[:] = [r.sequences_ids[0] for r in res]

    return run


# ------------------------------------------------------------------------------------------- seq2seq
def seq2seq(assets: Assets, threads: int, repeats: int, step: Step) -> Case:
    """The generation case for the Transformer encoder-decoder: the same prompts (as sources), batches and
    greedy min = max token counts; anchors HF ``MarianMTModel`` and a CTranslate2 ``Translator``."""
    s = assets.sizes
    case = Case("seq2seq", config={
        "model": f"Transformer encoder-decoder (post-LN, tied embeddings, relu), {s.s2s_layers}+{s.s2s_layers} "
                 f"layers, d_model {s.s2s_d_model}, {s.s2s_heads} heads, d_ff {s.s2s_d_ff}, vocab {s.vocab}",
        "source_len": s.prompt_len, "new_tokens": s.new_tokens, "batches": list(s.gen_batches),
        "decoding": "greedy, exactly new_tokens tokens (min = max), decoder started from <s>", "repeats": repeats,
        "weights": "random, chatforge bundle -> to-hf (MarianMTModel) -> CTranslate2 Translator (its BART/Marian "
                   "Transformers loader)"})
    step("seq2seq: building weights, to-hf, CTranslate2 conversion")
    w = assets.seq2seq()
    from transformers import MarianMTModel


    makers = _chatforge_greedy(w.bundle, case)
    hf = MarianMTModel.from_pretrained(str(w.hf)).eval()
    case.engine("hf-fp32", "anchor", "transformers", "fp32")
    makers["hf-fp32"] = lambda x, n, out: _hf_seq2seq_fn(hf, x, n, out)
    if _ct2_engines(case, w.ct2):
        import ctranslate2

        for q, path in w.ct2.items():
            tr = ctranslate2.Translator(str(path), device="cpu", compute_type=q, intra_threads=threads,
                                        inter_threads=1)
            makers[f"ct2-{q}"] = (lambda t: lambda x, n, out: _ct2_translate_fn(t, w.vocab, x, n, out))(tr)
    index = {t: i for i, t in enumerate(w.vocab or [])}
    # A Translator answers token strings: mapped back to ids, after timing.
    _greedy_batches(case, makers, s, repeats, step, seed=1000,
                    decode=lambda n, rows: [[index[t] for t in row] for row in rows] if n.startswith("ct2-") else rows)
    return case


def _hf_seq2seq_fn(hf, sources: torch.Tensor, n: int, out: list) -> Callable[[], None]:
    """``MarianMTModel.generate``, greedy, exactly ``n`` new tokens; its output starts with the decoder
    start token, which is not a generated one."""
    mask = torch.ones_like(sources)

    def run():
        with torch.inference_mode():
            ids = hf.generate(sources, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=n,
                              min_new_tokens=n)
        out[:] = ids[:, 1:].tolist()

    return run


def _ct2_translate_fn(tr, vocab: list[str], sources: torch.Tensor, n: int, out: list) -> Callable[[], None]:
    """A CTranslate2 ``Translator``, greedy, exactly ``n`` tokens; ``out`` gets the token strings."""
    tokens = [[vocab[i] for i in row] for row in sources.tolist()]

    def run():
        res = tr.translate_batch(tokens, beam_size=1, max_decoding_length=n, min_decoding_length=n)
        out[:] = [r.hypotheses[0] for r in res]

    return run


def _agreement(outputs: dict[int, dict[str, list]], reference: str, fp32_anchors: tuple[str, ...]) -> dict:
    """Per engine, the fraction of sequences (over every batch) whose greedy tokens equal the reference's."""
    same: dict[str, list[bool]] = {}
    prefix: dict[str, list[float]] = {}
    for outs in outputs.values():
        ref = outs.get(reference)
        for name, rows in outs.items():
            if name != reference and ref is not None:
                same.setdefault(name, []).extend(a == b for a, b in zip(ref, rows, strict=True))
                prefix.setdefault(name, []).extend(_common_prefix(a, b) / max(1, len(a))
                                                   for a, b in zip(ref, rows, strict=True))
    frac = {n: round(sum(v) / len(v), 4) for n, v in same.items() if v}
    present = [a for a in fp32_anchors if a in frac]
    return {"reference": reference, "identical_fraction": frac,
            # Lower precisions round logits, so a random model's near-tied greedy choices part somewhere;
            # how far the sequences agree before that says more than identical or not.
            "mean_common_prefix_fraction": {n: round(sum(v) / len(v), 4) for n, v in prefix.items() if v},
            "fp32_anchors": present, "identical_fp32": bool(present) and all(frac[a] == 1.0 for a in present)}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------------------------------- classification
def classification(assets: Assets, threads: int, repeats: int, step: Step) -> Case:
    s = assets.sizes
    case = Case("classification", config={
        "model": f"BERT classifier, {s.bert_layers} layers, d_model {s.bert_d_model}, {s.bert_heads} heads, "
                 f"vocab {s.vocab}, {s.num_labels} labels",
        "transformer_model": f"Transformer encoder classifier (post-LN, mean pooling), {s.s2s_layers} layers, "
                             f"d_model {s.s2s_d_model}, {s.s2s_heads} heads, d_ff {s.s2s_d_ff}, vocab {s.vocab}, "
                             f"{s.num_labels} labels; its metrics and engines are named 'transformer'",
        "seq_len": s.cls_seq_len, "calls_per_repeat": s.cls_calls, "repeats": repeats,
        "weights": "random, chatforge bundle -> to-hf (BertForSequenceClassification) -> torch.onnx.export; "
                   "the Transformer classifier (no HF class has its head) -> torch.onnx.export of the chatforge "
                   "model itself, as serve --backend onnxruntime does; int8: onnxruntime.quantization."
                   "quantize_dynamic"})
    step("classification: building weights, to-hf, ONNX export, int8 quantization")
    w = assets.bert()
    labels = [f"label{i}" for i in range(s.num_labels)]

    def inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
        x = _random_ids(batch, s.cls_seq_len, s.vocab, seed)
        x[:, 0] = 4  # [CLS]
        mask = torch.ones_like(x)
        g = torch.Generator().manual_seed(seed)
        for i in range(batch):  # rows of varied length, right-padded, as real batches are
            n = int(torch.randint(s.cls_seq_len // 2, s.cls_seq_len + 1, (1,), generator=g)) if batch > 1 else s.cls_seq_len
            x[i, n - 1] = 5  # [SEP]
            x[i, n:] = 0
            mask[i, n:] = 0
        return {"input_ids": x, "attention_mask": mask, "token_type_ids": torch.zeros_like(x)}

    case.agreement = _classify(case, w.bundle, w.onnx or {}, inputs, "", threads, repeats, step)
    step("classification: Transformer encoder weights, ONNX export, int8 quantization")
    t = transformer_classifier_weights(assets.work, vocab=s.vocab, layers=s.s2s_layers, d_model=s.s2s_d_model,
                                       heads=s.s2s_heads, d_ff=s.s2s_d_ff, max_len=max(64, s.cls_seq_len),
                                       labels=labels)
    # The same rows without [CLS]/[SEP] and segments: the Transformer reads the pad id (0) as its mask.
    case.agreement["transformer"] = _classify(case, t.bundle, t.onnx, lambda b, seed: {
        "input_ids": inputs(b, seed)["input_ids"]}, "transformer", threads, repeats, step)
    return case


def _classify(case: Case, bundle: Path, onnx: dict[str, Path], inputs: Callable[[int, int], dict[str, torch.Tensor]],
              model: str, threads: int, repeats: int, step: Step) -> dict[str, Any]:
    """Time one classifier's chatforge precisions and ONNX Runtime sessions at batch 1 (latency) and 32
    (throughput). ``model`` names the metrics and engines beside the case's first model ("" for it)."""
    import onnxruntime as ort

    from chatforge.decoding import autocast_for

    s_calls = case.config["calls_per_repeat"]
    tag = f"{model}-" if model else ""
    fns: dict[str, Callable[[dict], Callable[[], None]]] = {}
    last: dict[str, Any] = {}
    for p, m in _chatforge_models(bundle, case, prefix=f"chatforge-{tag}").items():
        def mk(feed, m=m, name=f"chatforge-{tag}{p}"):
            def run():
                for _ in range(s_calls):
                    with torch.inference_mode(), autocast_for(m):
                        logits = m(**feed).logits
                last[name] = logits.float().numpy()
            return run

        fns[f"chatforge-{tag}{p}"] = mk
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # ORT's pool spins after each run by default, which would take the cores from the engine timed next.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for p, path in onnx.items():
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        case.engine(f"ort-{tag}{p}", "anchor", "onnxruntime", p)

        def mk(feed, sess=sess, name=f"ort-{tag}{p}"):
            np_feed = {k: v.numpy() for k, v in feed.items()}

            def run():
                for _ in range(s_calls):
                    logits = sess.run(None, np_feed)[0]
                last[name] = logits
            return run

        fns[f"ort-{tag}{p}"] = mk
    for batch, metric, unit, rate in ((1, "latency", "ms", False), (32, "throughput", "sequences/s", True)):
        metric = f"{model} {metric}" if model else metric
        step(f"classification: batch {batch} {metric}")
        feed = inputs(batch, batch)
        times = interleaved({n: mk(feed) for n, mk in fns.items()}, repeats)
        case.add(metric, unit, rate, batch, times, batch * s_calls if rate else s_calls)
    reference = f"chatforge-{tag}fp32"
    ref = last[reference]
    preds = ref.argmax(-1)
    return {
        "reference": reference, "inputs": "the batch-32 inputs",
        "argmax_agreement": {n: round(float((v.argmax(-1) == preds).mean()), 4) for n, v in last.items()
                             if n != reference},
        "max_abs_logit_diff": {n: round(float(abs(v - ref).max()), 6) for n, v in last.items() if n != reference},
        "distinct_predictions": int(len(set(preds.tolist()))),  # agreement on one repeated class would say little
    }


# ------------------------------------------------------------------------------------------ tokenizer
def sample_texts() -> list[str]:
    from chatforge.data import read_examples

    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "chitchat.csv"
    examples, _ = read_examples(sample)
    return [e.text for e in examples] + [e.response for e in examples if e.response]


def hf_tokenizer_from_sentencepiece(proto: bytes):
    """The same SentencePiece unigram model as a Hugging Face ``tokenizers.Tokenizer``: its pieces and
    scores, its precompiled normalizer and the ``▁`` word-boundary pre-tokenizer (what transformers'
    SpmConverter built for slow SentencePiece tokenizers)."""
    tokenizers = need("tokenizers")
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(proto)
    if m.trainer_spec.model_type != m.trainer_spec.UNIGRAM:
        raise ValueError("only unigram SentencePiece models convert here")
    unk = next(i for i, p in enumerate(m.pieces) if p.type == p.UNKNOWN)
    # Control and unknown pieces (<s>, [CLS], <unk>) never match text in SentencePiece (a literal "<s>" is
    # '<' 's' '>'): in the copy they are renamed to start with a NUL, which text does not hold, so the Unigram lattice does not
    # choose them either; their ids stay. User-defined pieces ([MASK]) stay ordinary entries: SentencePiece
    # matches them inside the text after its "▁" prefix, as the lattice then does.
    unreachable = (m.pieces[0].CONTROL, m.pieces[0].UNKNOWN)
    vocab = [("\x00" + p.piece if p.type in unreachable else p.piece, p.score) for p in m.pieces]
    tk = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=unk, byte_fallback=m.trainer_spec.byte_fallback))
    charsmap = m.normalizer_spec.precompiled_charsmap
    # chatforge's own tokenizers use SentencePiece's identity rule (no charsmap) and compose to NFC in encode; older
    # ones and other SentencePiece models carry NFKC as a precompiled charsmap
    norm = [tokenizers.normalizers.Precompiled(charsmap)] if charsmap else [tokenizers.normalizers.NFC()]
    if m.normalizer_spec.remove_extra_whitespaces:
        norm += [tokenizers.normalizers.Strip(), tokenizers.normalizers.Replace(tokenizers.Regex(" {2,}"), " ")]
    tk.normalizer = tokenizers.normalizers.Sequence(norm)
    scheme = "always" if m.normalizer_spec.add_dummy_prefix else "never"
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    return tk


def tokenizer(assets: Assets, threads: int, repeats: int, step: Step) -> Case:
    s = assets.sizes
    from chatforge.tokenizer import Tokenizer

    step("tokenizer: training SentencePiece on the sample corpus")
    texts = sample_texts()
    sp = Tokenizer.train(texts, vocab_size=s.tokenizer_vocab, on_vocab_too_large="lower")
    hf = hf_tokenizer_from_sentencepiece(sp.to_bytes())
    corpus = texts * s.tokenizer_copies
    case = Case("tokenizer", config={
        "tokenizer": f"SentencePiece unigram, vocab {sp.vocab_size}, trained on the packaged sample corpus",
        "anchor": "Hugging Face tokenizers Unigram with the same pieces, scores and normalizer",
        "sentences": len(corpus), "repeats": repeats})
    case.engine("chatforge", "chatforge", "chatforge (sentencepiece)", "-")
    case.engine("hf-tokenizers", "anchor", "tokenizers", "-")
    outs: dict[str, list] = {}

    def batch_fn(name, fn):
        def run():
            outs[name] = fn(corpus)
        return run

    step("tokenizer: batch encode")
    times = interleaved({
        "chatforge": batch_fn("chatforge", sp.encode_batch),
        "hf-tokenizers": batch_fn("hf-tokenizers",
                                  lambda c: [e.ids for e in hf.encode_batch(c, add_special_tokens=False)])},
        repeats)
    case.add("batch encode", "sentences/s", True, len(corpus), times, len(corpus))
    step("tokenizer: one sentence at a time")
    times = interleaved({
        "chatforge": lambda: [sp.encode(t) for t in corpus],
        "hf-tokenizers": lambda: [hf.encode(t, add_special_tokens=False).ids for t in corpus]}, repeats)
    case.add("one at a time", "sentences/s", True, 1, times, len(corpus))
    same = [a == b for a, b in zip(outs["chatforge"], outs["hf-tokenizers"], strict=True)]
    case.agreement = {"reference": "chatforge", "identical_fraction": {"hf-tokenizers": round(sum(same) / len(same), 4)}}
    return case


# ------------------------------------------------------------------------------------------- training
def training(assets: Assets, threads: int, repeats: int, step: Step) -> Case:
    s = assets.sizes
    step("training: building weights, to-hf")
    w = assets.gpt()
    from transformers import AutoModelForCausalLM

    from chatforge.bundle import load_bundle

    flops_per_token = gpt_train_flops_per_token(s.gpt_layers, s.gpt_d_model, 4 * s.gpt_d_model, s.vocab,
                                                s.train_seq_len)
    case = Case("training", config={
        "model": f"GPT-2, {s.gpt_layers} layers, d_model {s.gpt_d_model}, vocab {s.vocab}",
        "batch": s.train_batch, "seq_len": s.train_seq_len, "steps_per_repeat": s.train_steps, "repeats": repeats,
        "step": "forward + backward + AdamW", "flops_per_token": flops_per_token,
        "flops": "6 x matmul weights (blocks + vocabulary head) + 12 x layers x seq_len x d_model per token",
        # As chatforge's Trainer runs it: torch's matmul or oneDNN's (runtime.fp32_linear_kernels, AMD CPUs)
        "chatforge_fp32_linear": training_linear_kernels("fp32"),
        "matmul_peak": "the faster of torch.matmul and oneDNN's linear op on (n, n) @ (n, n)"},
        same_precision_ratios=True)
    x = _random_ids(s.train_batch, s.train_seq_len, s.vocab, seed=0)
    tokens = s.train_batch * s.train_seq_len * s.train_steps
    peaks: dict[str, float] = {}
    for p in TRAIN_PRECISIONS:
        if p == "bf16" and not native_bf16():
            case.engine(f"chatforge-{p}", "chatforge", "chatforge", p, "skipped", EMULATED_BF16)
            case.engine(f"hf-{p}", "anchor", "transformers", p, "skipped", EMULATED_BF16)
            case.engine(f"hf-eager-{p}", "anchor", "transformers (attn_implementation=eager)", p, "skipped",
                        EMULATED_BF16)
            continue
        step(f"training: matmul peak {p}")
        # The best of 10 calls, measured again after the training rounds: one short measurement taken while
        # a neighbour held a core once came out below what the training step then achieved.
        peaks[p] = matmul_peak_flops(s.matmul_n, p, reps=10)
        mine = load_bundle(w.bundle).model
        # HF's default attention is SDPA; its "eager" attention (matmuls around a softmax, as chatforge's training
        # path on CPU computes small products: modules.attention.materialized_attention) is the second anchor.
        theirs = AutoModelForCausalLM.from_pretrained(str(w.hf))
        theirs_eager = AutoModelForCausalLM.from_pretrained(str(w.hf), attn_implementation="eager")
        case.engine(f"chatforge-{p}", "chatforge", "chatforge", p)
        case.engine(f"hf-{p}", "anchor", "transformers", p)
        case.engine(f"hf-eager-{p}", "anchor", "transformers (attn_implementation=eager)", p)
        step(f"training: {p}")
        times = interleaved({f"chatforge-{p}": train_steps_fn(mine, False, x, s.train_steps, p),
                             f"hf-{p}": train_steps_fn(theirs, True, x, s.train_steps, p),
                             f"hf-eager-{p}": train_steps_fn(theirs_eager, True, x, s.train_steps, p)}, repeats)
        case.add("train tokens/s", "tokens/s", True, s.train_batch, times, tokens)
        peaks[p] = max(peaks[p], matmul_peak_flops(s.matmul_n, p, reps=10))
    case.extra["matmul_peak_flops"] = {p: round(v) for p, v in peaks.items()}
    case.extra["matmul_n"] = s.matmul_n
    case.extra["fraction_of_peak"] = {
        r["engine"]: round(r["value"] * flops_per_token / peaks[case.engines[r["engine"]]["precision"]], 4)
        for r in case.rows}
    return case


# ------------------------------------------------------------------------------------------- scaling
def _gen_engines(w: GPTWeights, threads: int, case: Case) -> dict[str, Callable[[torch.Tensor, int, list], Callable[[], None]]]:
    """chatforge fp32, HF fp32 and CTranslate2 (float32, int8) greedy callables on the weights ``w``."""
    from transformers import AutoModelForCausalLM

    ids = {"pad_id": 0, "bos_id": 1, "eos_id": 2}
    model = _load_chatforge(w.bundle, "fp32").model
    hf = AutoModelForCausalLM.from_pretrained(str(w.hf)).eval()
    makers = {"chatforge-fp32": lambda x, n, out: greedy_fn(model, False, x, n, "fp32", out=out, **ids),
              "hf-fp32": lambda x, n, out: greedy_fn(hf, True, x, n, "fp32", out=out, **ids)}
    case.engine("chatforge-fp32", "chatforge", "chatforge", "fp32")
    case.engine("hf-fp32", "anchor", "transformers", "fp32")
    if w.ct2 is not None:
        import ctranslate2

        for q, path in w.ct2.items():
            gen = ctranslate2.Generator(str(path), device="cpu", compute_type=q, intra_threads=threads,
                                        inter_threads=1)
            case.engine(f"ct2-{q}", "anchor", "ctranslate2", q)
            makers[f"ct2-{q}"] = (lambda g: lambda x, n, out: _ct2_fn(g, w.vocab, x, n, out))(gen)
    return makers


def scaling(assets: Assets, threads: int, repeats: int, step: Step) -> Case:
    """Greedy generation curves in fp32: tokens/s against batch size, and time per token against the
    prompt length and the model width (batch 1), for chatforge and the anchors."""
    s = assets.sizes
    n = s.scaling_new_tokens
    case = Case("scaling", config={
        "model": f"GPT-2, {s.gpt_layers} layers, vocab {s.vocab}; d_model {s.gpt_d_model} unless varied",
        "new_tokens": n, "batches": list(s.scaling_batches), "prompt_lens": list(s.scaling_prompt_lens),
        "widths": list(s.scaling_widths), "repeats": repeats},
        extra={"x": {"tokens/s vs batch": "batch", "ms/token vs prompt length": "prompt length",
                     "ms/token vs d_model": "d_model"}})
    step("scaling: weights")
    makers = _gen_engines(assets.gpt(), threads, case)
    for b in s.scaling_batches:
        step(f"scaling: batch {b}")
        x = _random_ids(b, s.prompt_len, s.vocab, seed=100 + b)
        times = interleaved({e: mk(x, n, []) for e, mk in makers.items()}, repeats)
        case.add("tokens/s vs batch", "tokens/s", True, b, times, b * n)
    for length in s.scaling_prompt_lens:
        step(f"scaling: prompt length {length}")
        x = _random_ids(1, min(length, s.positions - n), s.vocab, seed=200 + length)
        times = interleaved({e: mk(x, n, []) for e, mk in makers.items()}, repeats)
        case.add("ms/token vs prompt length", "ms/token", False, length, times, n)
    for width in s.scaling_widths:
        step(f"scaling: d_model {width}")
        work = assets.work / f"scaling-d{width}"
        work.mkdir(exist_ok=True)
        w = gpt_weights(work, vocab=s.vocab, layers=s.gpt_layers, d_model=width, heads=max(1, width // 64),
                        positions=s.positions, init_std=s.init_std)
        width_makers = _gen_engines(w, threads, Case("scaling-width"))
        x = _random_ids(1, s.prompt_len, s.vocab, seed=300)
        times = interleaved({e: mk(x, n, []) for e, mk in width_makers.items()}, repeats)
        case.add("ms/token vs d_model", "ms/token", False, width, times, n)
    return case


CASES: dict[str, Callable[[Assets, int, int, Step], Case]] = {
    "generation": generation, "seq2seq": seq2seq, "classification": classification, "tokenizer": tokenizer,
    "training": training, "scaling": scaling}

# Parts of issue 16 that this command does not measure, and why (written into every report).
LEFT_OUT = {
    "end-to-end gRPC": "not part of this command: benchmarks/serving_bench.py and benchmarks/grpc_path.py measure "
                       "the serving path (they start servers and clients in separate processes).",
}


def run_case(name: str, assets: Assets, threads: int, repeats: int, step: Step) -> Case:
    """Run one case; a missing anchor skips it (with the reason) instead of failing the run."""
    try:
        case = CASES[name](assets, threads, repeats, step)
    except AnchorMissing as e:
        logger.warning("case %s skipped: %s", name, e)
        return Case(name, status="skipped", reason=str(e))
    except Exception as e:  # one broken case (an anchor's converter, say) must not lose the others' figures
        logger.exception("case %s failed", name)
        return Case(name, status="failed", reason=f"{type(e).__name__}: {e}")
    case.compute_ratios()
    return case
