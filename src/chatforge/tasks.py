"""Task data pipelines: examples -> tensors for each task, independent of the family.

generation (seq2seq): source = encode(text), target = <s> encode(response) </s>;
  decoder_input_ids = target[:-1], labels = target[1:] with padding as -100.
classification: input_ids = encode(text), labels = index of the label; with outlier exposure
  (:class:`OutlierExposureDataset`) unlabelled out-of-domain rows join the batches, flagged by ``outlier_mask``;
  with distillation (:class:`SoftTargetDataset`) each row also carries a teacher's probabilities, ``teacher_probs``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from chatforge.data import Example
from chatforge.tokenizer import Tokenizer, nfc

IGNORE_INDEX = -100
# The batch key flagging outlier-exposure rows (B,) bool; the Trainer takes it out before calling the model.
OUTLIER_MASK = "outlier_mask"
# The batch key carrying a teacher's class probabilities (B, C) for distillation; the Trainer takes it out too.
TEACHER_PROBS = "teacher_probs"


class TaskDataError(ValueError):
    pass


@dataclass
class TaskSpec:
    task: str
    family: str | None = None
    max_source_len: int = 64
    max_target_len: int = 64
    labels: list[str] | None = None
    context_turns: int = 0  # generation: earlier turns read before the message (data.context_turns)


def source_ids(tok: Tokenizer, examples: Sequence[Example], max_len: int, context_turns: int = 0) -> list[list[int]]:
    """Each example's model input, at most ``max_len`` ids: the message, after up to ``context_turns`` of its
    earlier turns (``turn [SEP] turn [SEP] message``, :func:`chatforge.tokenizer.join_turns`). The same rule
    serves requests (``Seq2SeqGenerator.encode_prompt``), so training and serving see one format."""
    if not context_turns:
        return [ids[:max_len] for ids in tok.encode_batch([e.text for e in examples])]
    return [tok.encode_with_context(e.text, e.context, max_turns=context_turns, budget=max_len)[0][:max_len]
            for e in examples]


class Seq2SeqDataset(Dataset):
    def __init__(self, examples: Sequence[Example], tok: Tokenizer, max_source_len: int, max_target_len: int,
                 context_turns: int = 0):
        missing = [e.source or repr(e.text) for e in examples if not e.response]
        if missing:
            raise TaskDataError(
                f"task 'generation' needs a response for every example; {len(missing)} have none, "
                f"e.g. {missing[:3]}"
            )
        srcs = source_ids(tok, examples, max_source_len, context_turns)
        tgts = tok.encode_batch([e.response for e in examples])
        self.items = []
        for s, t in zip(srcs, tgts, strict=True):
            t = [tok.bos_id] + t[: max_target_len - 2] + [tok.eos_id]
            self.items.append((s or [tok.unk_id], t))
        self.pad_id = tok.pad_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def collate(self, batch):
        src_len = max(len(s) for s, _ in batch)
        tgt_len = max(len(t) for _, t in batch) - 1
        B = len(batch)
        input_ids = torch.full((B, src_len), self.pad_id, dtype=torch.long)
        dec_in = torch.full((B, tgt_len), self.pad_id, dtype=torch.long)
        labels = torch.full((B, tgt_len), IGNORE_INDEX, dtype=torch.long)
        for i, (s, t) in enumerate(batch):
            input_ids[i, : len(s)] = torch.tensor(s)
            dec_in[i, : len(t) - 1] = torch.tensor(t[:-1])
            labels[i, : len(t) - 1] = torch.tensor(t[1:])
        return {"input_ids": input_ids, "decoder_input_ids": dec_in, "labels": labels}


class ClassificationDataset(Dataset):
    def __init__(self, examples: Sequence[Example], tok: Tokenizer, labels: list[str], max_source_len: int):
        index = {lab: i for i, lab in enumerate(labels)}
        unknown = sorted({e.label for e in examples if e.label not in index}, key=str)
        if unknown:
            raise TaskDataError(
                f"labels {unknown[:10]} are not among the model's {len(labels)} labels {labels[:10]}..."
            )
        self.items = [
            ((ids[:max_source_len] or [tok.unk_id]), index[e.label])
            for ids, e in zip(tok.encode_batch([e.text for e in examples]), examples, strict=True)
        ]
        self.pad_id = tok.pad_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def collate(self, batch):
        L = max(len(s) for s, _ in batch)
        input_ids = torch.full((len(batch), L), self.pad_id, dtype=torch.long)
        for i, (s, _) in enumerate(batch):
            input_ids[i, : len(s)] = torch.tensor(s)
        return {"input_ids": input_ids, "labels": torch.tensor([y for _, y in batch], dtype=torch.long)}


def label_set(examples: Sequence[Example]) -> list[str]:
    labels = sorted({e.label for e in examples if e.label is not None}, key=str)
    missing = [e.source or repr(e.text) for e in examples if e.label is None]
    if missing:
        raise TaskDataError(
            f"task 'classification' needs a label for every example; {len(missing)} have none, e.g. {missing[:3]}"
        )
    if len(labels) < 2:
        raise TaskDataError(f"task 'classification' needs at least 2 distinct labels, found {labels}")
    return labels


@dataclass(frozen=True)
class TaskDef:
    """How a task turns examples into a dataset (with a ``collate`` method) for the trainer.

    ``needs_labels``: the task has a label set (stored in the bundle's labels.json).
    ``generates``: the trained model can answer with text (sample replies, Reply RPC).
    ``load``: ``(path, data_config) -> examples`` for a task whose data is not rows of text
    (token tagging reads one tagged sentence per line); ``None`` reads with ``read_examples``.
    ``labels``: ``examples -> label set`` when the labels are not ``Example.label`` (tag sets);
    ``None`` uses :func:`label_set`.
    """

    name: str
    build: Callable[[TaskSpec, Sequence[Example], Tokenizer], Dataset]
    needs_labels: bool = False
    generates: bool = False
    load: Callable[[Path, Any], list[Example]] | None = None
    labels: Callable[[Sequence[Example]], list[str]] | None = None

    def label_set(self, examples: Sequence[Example]) -> list[str]:
        return (self.labels or label_set)(examples)


_TASKS: dict[tuple[str | None, str], TaskDef] = {}


def register_task(name: str, *, family: str | None = None, needs_labels: bool = False, generates: bool = False,
                  load: Callable[[Path, Any], list[Example]] | None = None,
                  labels: Callable[[Sequence[Example]], list[str]] | None = None):
    """Register a dataset builder for a task name (``load``/``labels``: see :class:`TaskDef`).

    ``family=None`` registers the default pipeline for the task; a family whose
    inputs differ (GPT's ``question [SEP] answer``, BERT's ``[CLS] a [SEP] b [SEP]``
    with segments) registers its own under ``family`` and it takes precedence.
    """

    def deco(fn: Callable[[TaskSpec, Sequence[Example], Tokenizer], Dataset]):
        key = (family, name)
        if key in _TASKS:
            raise ValueError(f"task {name!r} (family {family!r}) is already registered")
        _TASKS[key] = TaskDef(name, fn, needs_labels, generates, load, labels)
        return fn

    return deco


def get_task(name: str, family: str | None = None) -> TaskDef:
    found = _TASKS.get((family, name)) or _TASKS.get((None, name))
    if found is None:
        known = sorted({t for _, t in _TASKS})
        raise TaskDataError(f"unknown task {name!r}; known tasks: {', '.join(known)}")
    return found


def generating_tasks() -> list[str]:
    """The tasks whose models answer with text (``TaskDef.generates``) under any family, for messages that say
    which tasks something is for."""
    return sorted({name for (_, name), t in _TASKS.items() if t.generates})


@register_task("generation", generates=True)
def _generation(spec: TaskSpec, examples: Sequence[Example], tok: Tokenizer) -> Dataset:
    return Seq2SeqDataset(examples, tok, spec.max_source_len, spec.max_target_len, spec.context_turns)


@register_task("classification", needs_labels=True)
def _classification(spec: TaskSpec, examples: Sequence[Example], tok: Tokenizer) -> Dataset:
    assert spec.labels is not None
    return ClassificationDataset(examples, tok, spec.labels, spec.max_source_len)


def make_dataset(spec: TaskSpec, examples: Sequence[Example], tok: Tokenizer) -> Dataset:
    return get_task(spec.task, spec.family).build(spec, examples, tok)


class SubwordSampler:
    """A SentencePiece :class:`Tokenizer` whose ``encode``/``encode_batch`` sample a segmentation (subword
    regularization, Kudo 2018: unigram models sample from the segmentation lattice smoothed by ``alpha``, BPE models
    drop merges with probability ``alpha``) among the ``nbest`` best (-1: all); every other attribute is the
    tokenizer's. Texts are encoded one by one: SentencePiece's threaded list form would make the draws depend on
    thread scheduling, not only on the seed (:func:`seed_subword_sampling`)."""

    def __init__(self, tok: Tokenizer, alpha: float, nbest: int = -1) -> None:
        if getattr(tok, "kind", None) != "sentencepiece":
            raise TaskDataError(f"subword sampling needs a SentencePiece tokenizer, not {getattr(tok, 'kind', tok)!r}")
        self._tok, self.alpha, self.nbest = tok, alpha, nbest

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def encode(self, text: str) -> list[int]:
        return self._tok.sp.encode(nfc(text), out_type=int, enable_sampling=True, alpha=self.alpha,
                                   nbest_size=self.nbest)  # NFC as Tokenizer.encode (no NFKC inside SentencePiece)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


def seed_subword_sampling(seed: int, epoch: int) -> None:
    """Seed SentencePiece's sampler (process-wide) from (run seed, epoch): an epoch's segmentations are a function
    of the two, so a resumed run and one DDP rank see what an uninterrupted single process sees."""
    import sentencepiece as spm

    spm.set_random_generator_seed((seed * 1_000_003 + epoch) % (2**31 - 1) + 1)


class ResegmentedDataset(Dataset):
    """A training set rebuilt every epoch from freshly sampled segmentations of its texts (``train.subword_alpha``).

    ``build(tokenizer)`` makes the set (the task's dataset, with outliers mixed in where there are any) from a
    tokenizer; here it gets a :class:`SubwordSampler`. :meth:`set_epoch`, which the Trainer calls at the start of
    each epoch, re-segments with the sampler seeded by (seed, epoch). The rows stay in place (row i is example i),
    so the sampler's order, exact resume and DDP are as for any dataset.
    """

    def __init__(self, build: Callable[[Any], Dataset], tok: Tokenizer, alpha: float, nbest: int, seed: int) -> None:
        self._build, self._sampler, self._seed = build, SubwordSampler(tok, alpha, nbest), seed
        self.epoch: int | None = None
        self.current: Dataset = build(tok)  # replaced by set_epoch; sized like every epoch's
        self._n = len(self.current)  # type: ignore[arg-type]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        seed_subword_sampling(self._seed, epoch)
        current = self._build(self._sampler)
        if len(current) != self._n:  # type: ignore[arg-type]
            raise TaskDataError(f"re-segmenting the training set changed its size from {self._n} to {len(current)}")
        self.current, self.epoch = current, epoch

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        return self.current[i]

    def collate(self, batch):
        return self.current.collate(batch)  # type: ignore[attr-defined]


class OutlierExposureDataset(Dataset):
    """A classification training set with unlabelled out-of-domain rows mixed in (outlier exposure, Hendrycks
    et al. 2019, "Deep Anomaly Detection with Outlier Exposure").

    The outliers go through the family's own classification pipeline (so BERT gets its ``[CLS]``, ELMo its
    characters), with a placeholder label that the collate replaces by ``IGNORE_INDEX``: the model's own
    classification loss skips them (``F.cross_entropy`` ignores -100), and ``batch["outlier_mask"]`` tells the
    Trainer which rows' logits the outlier-exposure term (towards the uniform distribution) applies to. The
    sampler shuffles both kinds together, so every epoch sees every outlier once and the order stays a function of
    (seed, epoch): exact resume and DDP work as for any dataset.
    """

    def __init__(self, inner: Dataset, outliers: Dataset) -> None:
        if not hasattr(inner, "collate") or type(inner) is not type(outliers):
            raise TypeError("OutlierExposureDataset needs two datasets of one classification pipeline, got "
                            f"{type(inner).__name__} and {type(outliers).__name__}")
        self.inner, self.outliers = inner, outliers
        self.n_inner = len(inner)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n_inner + len(self.outliers)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        if i < self.n_inner:
            return self.inner[i], False
        return self.outliers[i - self.n_inner], True

    def collate(self, batch):
        out = self.inner.collate([item for item, _ in batch])
        labels = out.get("labels")
        if not isinstance(labels, torch.Tensor) or labels.shape != (len(batch),):
            raise TaskDataError("outlier exposure needs one label per example (task 'classification'); this "
                                f"pipeline gives labels of shape {getattr(labels, 'shape', None)}")
        mask = torch.tensor([flag for _, flag in batch], dtype=torch.bool)
        out["labels"] = labels.masked_fill(mask, IGNORE_INDEX)
        out[OUTLIER_MASK] = mask
        return out


def with_outliers(spec: TaskSpec, train: Dataset, texts: Sequence[str], tok: Tokenizer) -> OutlierExposureDataset:
    """``train`` (a classification dataset built by :func:`make_dataset`) with ``texts`` mixed in as outliers."""
    if spec.task != "classification" or not spec.labels:
        raise TaskDataError(f"outlier exposure is for task 'classification' with labels, not {spec.task!r}")
    placeholder = spec.labels[0]  # any label the pipeline accepts; the collate replaces it by IGNORE_INDEX
    outliers = make_dataset(spec, [Example(text=t, label=placeholder) for t in texts], tok)
    return OutlierExposureDataset(train, outliers)


def outlier_exposure_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from the softmax of ``logits`` (N, C) to the uniform distribution over the C classes:
    ``logsumexp(z) - mean(z)`` per row, the outlier-exposure term of Hendrycks et al. (2019) for classifiers."""
    z = logits.float()
    return (torch.logsumexp(z, dim=-1) - z.mean(dim=-1)).mean()


def supervised_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float,
                                bank_features: torch.Tensor | None = None,
                                bank_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "Supervised Contrastive Learning", L_out) over unit
    feature vectors: each row of ``features`` (N, D) is an anchor whose positives are the other rows and the
    ``bank_features`` (M, D) rows (features of earlier batches, no gradient) with its label; the candidates are
    every other row and the whole bank. Per anchor: minus the mean over its positives of
    ``s_p - logsumexp_a s_a``, s = cosine / ``temperature``; anchors without a positive are left out, and with
    none at all the loss is 0 (still connected to ``features``, so backward works)."""
    z = F.normalize(features.float(), dim=-1)
    sims = z @ z.t() / temperature  # (N, N)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    sims = sims.masked_fill(self_mask, float("-inf"))
    if bank_features is not None and len(bank_features):
        sims = torch.cat([sims, z @ bank_features.t().to(z) / temperature], dim=1)
        pos = torch.cat([pos, labels[:, None] == bank_labels[None, :].to(labels.device)], dim=1)
    log_prob = sims - torch.logsumexp(sims, dim=1, keepdim=True)
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    mean_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)[has] / n_pos[has]
    return -mean_pos.mean()


class FeatureBank:
    """A first-in-first-out memory of the last ``size`` unit feature vectors and their labels (a MoCo-style queue,
    without a momentum encoder): the positives and negatives of :func:`supervised_contrastive_loss` beyond one
    batch, where a batch of 64 rows over 151 intents holds few pairs of one label."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.features: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        z = F.normalize(features.detach().float(), dim=-1)
        if self.features is None:
            self.features, self.labels = z[-self.size:], labels.detach()[-self.size:]
        else:
            self.features = torch.cat([self.features, z])[-self.size:]
            self.labels = torch.cat([self.labels, labels.detach()])[-self.size:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.features is None else {"features": self.features.cpu(), "labels": self.labels.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        if state:
            self.features, self.labels = state["features"].to(device), state["labels"].to(device)
        else:
            self.features = self.labels = None


class SoftTargetDataset(Dataset):
    """A classification training set whose rows also carry a teacher's class probabilities (knowledge distillation,
    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

    ``probs`` (len(inner), C) holds row i's teacher distribution over the student's labels, in the student's order;
    the collate adds ``batch["teacher_probs"]``. ``inner`` may itself be an :class:`OutlierExposureDataset`: its
    outlier rows then carry any row (the Trainer distils labelled rows only). Items are ``(inner item, index)``, so
    the sampler's order, exact resume and DDP are those of ``inner``.
    """

    def __init__(self, inner: Dataset, probs: torch.Tensor) -> None:
        if not hasattr(inner, "collate"):
            raise TypeError(f"SoftTargetDataset needs a dataset with a collate, got {type(inner).__name__}")
        n = len(inner)  # type: ignore[arg-type]
        if probs.dim() != 2 or probs.size(0) != n:
            raise TaskDataError(f"teacher probabilities must have one row per training row: shape ({n}, C), "
                                f"got {tuple(probs.shape)}")
        self.inner, self.probs = inner, probs.float()

    def __len__(self) -> int:
        return self.probs.size(0)

    def __getitem__(self, i: int):
        return self.inner[i], i

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):  # a ResegmentedDataset inside
            self.inner.set_epoch(epoch)

    def collate(self, batch):
        out = self.inner.collate([item for item, _ in batch])
        out[TEACHER_PROBS] = self.probs[torch.tensor([i for _, i in batch], dtype=torch.long)]
        return out


def distillation_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(q_T || softmax(z / T))`` averaged over rows, where ``q_T`` is the teacher's distribution ``q``
    sharpened or softened to temperature ``T`` (``q^(1/T)`` renormalised, i.e. ``softmax(log q / T)``, the
    teacher's logits up to a constant). The ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton
    et al. 2015, section 2)."""
    z = logits.float()
    log_q = torch.log(teacher_probs.float().clamp_min(1e-12)) / temperature
    log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return kl.mean() * temperature**2
