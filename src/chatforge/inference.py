"""Inference over a loaded bundle: the objects the serving engine drives.

No grpc here. The engine (``serving/engine.py``) only relies on the two protocols
below, so it can be tested with fakes and serves every family the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from chatforge.decoding import GenerationOptions


@dataclass
class TokenDelta:
    """One generated token and the text it adds to the reply so far (may be "")."""

    token_id: int
    text: str


@dataclass
class ClassPrediction:
    label: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    out_of_scope: bool = False


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
        for token_id in generate_stream(self.model, ids, options, bos_id=self.tok.bos_id, eos_id=self.tok.eos_id):
            yield TokenDelta(token_id=token_id, text=detok.feed(token_id))


class Classifier:
    """Scores texts with a classification bundle; returns every label's probability."""

    def __init__(self, bundle, name: str, version: str = "1"):
        self.bundle = bundle
        self.tok = bundle.tokenizer
        self.model = bundle.model
        self.labels: list[str] = list(bundle.labels or [])
        self.max_input_tokens = bundle.config.train.max_source_len
        self.info = ModelInfo(name=name, family=bundle.family, task=bundle.task, version=version,
                              metadata=dict(bundle.metadata))

    def count_tokens(self, text: str) -> int:
        return len(self.tok.encode(text))

    def classify(self, texts: list[str]) -> list[ClassPrediction]:
        import torch

        seqs = [ids[: self.max_input_tokens] or [self.tok.unk_id] for ids in self.tok.encode_batch(texts)]
        L = max(len(s) for s in seqs)
        x = torch.full((len(seqs), L), self.tok.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(s)
        with torch.inference_mode():
            probs = self.model(input_ids=x).logits.float().softmax(-1)
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            label = self.labels[best]
            out.append(ClassPrediction(label=label, score=row[best],
                                       scores=dict(zip(self.labels, row, strict=True)),
                                       out_of_scope=label == "oos"))
        return out


def load_model(bundle_dir, name: str, version: str = "1") -> ReplyGenerator | TextClassifier:
    """Load a bundle and wrap it for serving by its task."""
    from chatforge.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if bundle.task == "generation":
        return Seq2SeqGenerator(bundle, name, version)
    if bundle.task == "classification":
        return Classifier(bundle, name, version)
    raise ValueError(f"bundle {bundle_dir} has task {bundle.task!r}, which chatforge cannot serve")
