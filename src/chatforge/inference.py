"""Inference over a loaded bundle: the objects the serving engine drives.

No grpc here. The engine (``serving/engine.py``) only relies on the two protocols
below, so it can be tested with fakes and serves every family the same way.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from chatforge.decoding import GenerationOptions
from chatforge.predictions import ClassPrediction  # re-exported; defined torch-free for the client

logger = logging.getLogger(__name__)

# Serving precisions. bf16 casts a torch model's weights once at load and runs it under bf16
# autocast, which casts any fp32 activation or buffer a family mixes in for the matmuls (on CUDA
# it also keeps norms and softmax in fp32; CPU kernels accumulate bf16 norms in fp32). On CPUs
# with AMX or AVX512-BF16, and on GPUs, matmuls run several times faster; the numbers move by
# bf16 rounding only (tests/test_precision.py).
PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    return precision


def autocast_for(model):
    """bf16 autocast when ``model``'s weights are bf16 (see :func:`load_model`), else a no-op.

    Autocast state is per thread, so every thread that runs the model enters it; the weights
    are bf16 already, so autocast casts only activations and keeps no weight copies.
    """
    import torch

    try:
        param = next(model.parameters())
    except (AttributeError, StopIteration):
        return contextlib.nullcontext()
    if param.dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=param.device.type, dtype=torch.bfloat16)


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
        self.info = ModelInfo(name=name, family=bundle.family, task=bundle.task, version=version,
                              metadata=dict(bundle.metadata))

    def count_tokens(self, text: str) -> int:
        return len(self.tok.encode(text))

    def stream(self, text: str, options: GenerationOptions) -> Iterator[TokenDelta]:
        from chatforge.decoding import generate_stream

        ids = self.tok.encode(text)[: self.max_input_tokens] or [self.tok.unk_id]
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

    def step_spec(self):
        """The step-wise interface continuous batching drives (serving/batching.py), or None."""
        from chatforge.serving.batching import Seq2SeqStepModel, StepSpec

        if not Seq2SeqStepModel.supports(self.model):
            return None
        return StepSpec(model=Seq2SeqStepModel(self.model), encode=self.tok.encode,
                        new_detokenizer=self.tok.incremental_decoder, bos_id=self.tok.bos_id,
                        eos_id=self.tok.eos_id, unk_id=self.tok.unk_id)


ESTIMATOR_MAX_WORDS = 4096  # estimators have no context window; this only bounds request size


def torch_class_probs(model, tok, texts: list[str], max_input_tokens: int, batch_size: int = 64):
    """(N, C) softmax probabilities of a torch classifier, computed in batches (numpy float32)."""
    import numpy as np
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        seqs = [ids[:max_input_tokens] or [tok.unk_id] for ids in tok.encode_batch(chunk)]
        if hasattr(model, "prepare_inputs"):
            # Families with their own input layout (BERT: [CLS] text [SEP] + segment ids) build it.
            batch = model.prepare_inputs(seqs)
        else:
            L = max(len(s) for s in seqs)
            x = torch.full((len(seqs), L), tok.pad_id, dtype=torch.long)
            for j, s in enumerate(seqs):
                x[j, : len(s)] = torch.tensor(s)
            batch = {"input_ids": x}
        with torch.inference_mode(), autocast_for(model):
            out.append(model(**batch).logits.float().softmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


class Classifier:
    """Scores texts with a classification bundle (torch model or estimator); returns every label's
    probability, and applies the bundle's out-of-scope policy (``chatforge.oos``)."""

    def __init__(self, bundle, name: str, version: str = "1"):
        from chatforge.oos import OOSPolicy

        self.bundle = bundle
        self.tok = bundle.tokenizer
        self.model = bundle.model
        self.labels: list[str] = list(bundle.labels or [])
        self.is_estimator = bundle.metadata.get("kind") == "estimator"
        self.max_input_tokens = ESTIMATOR_MAX_WORDS if self.is_estimator else bundle.config.train.max_source_len
        self.oos = OOSPolicy.from_metadata(bundle.metadata.get("oos"), bundle.path)
        self.info = ModelInfo(name=name, family=bundle.family, task=bundle.task, version=version,
                              metadata=dict(bundle.metadata))

    def count_tokens(self, text: str) -> int:
        if self.is_estimator:
            return len(text.split())  # estimators featurise words and characters, not sentencepieces
        return len(self.tok.encode(text))

    def predict_proba(self, texts: list[str]):
        """(N, C) probabilities, columns in ``self.labels`` order."""
        if self.is_estimator:
            return self.model.predict_proba(list(texts))
        return torch_class_probs(self.model, self.tok, list(texts), self.max_input_tokens)

    def predict_views(self, texts: list[str]) -> list:
        """``[probabilities]``, plus one view per kind of member for an ensemble (the oos scorer reads them)."""
        if self.is_estimator and hasattr(self.model, "predict_views"):
            return self.model.predict_views(list(texts))
        return [self.predict_proba(texts)]

    def classify(self, texts: list[str]) -> list[ClassPrediction]:
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


def load_model(bundle_dir, name: str, version: str = "1", precision: str = "fp32") -> ReplyGenerator | TextClassifier:
    """Load a bundle and wrap it for serving by its task.

    ``precision="bf16"`` casts a torch model's weights to bfloat16 (see :data:`PRECISIONS`);
    estimator bundles (XGBoost, linear, ensembles of them) are served as they are.
    """
    from chatforge.bundle import load_bundle

    check_precision(precision)
    bundle = load_bundle(bundle_dir)
    if precision == "bf16":
        import torch

        if isinstance(bundle.model, torch.nn.Module):
            bundle.model.to(torch.bfloat16)
            bundle.metadata = {**bundle.metadata, "precision": "bf16"}
        else:
            logger.info("precision bf16 does not apply to %s (%s bundle); serving it as it is",
                        name, bundle.family)
    if bundle.task in ("generation", "lm"):  # lm: a decoder-only model continuing the text (GPT)
        return Seq2SeqGenerator(bundle, name, version)
    if bundle.task == "classification":
        return Classifier(bundle, name, version)
    raise ValueError(f"bundle {bundle_dir} has task {bundle.task!r}, which chatforge cannot serve")
