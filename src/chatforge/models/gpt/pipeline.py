"""GPT task pipelines (Radford et al. 2018, section 3.3, task-aware input transformations).

lm:                  each text and each response is its own sequence ``ids </s>`` (no <s>, so a
                     prompt is continued as given, like GPT-2); input = seq[:-1], labels = seq[1:].
generation:          ``<s> question [SEP] answer </s>``; labels only on the answer and </s>
                     (the model adds the question's own loss when ``loss_on_prompt``).
pair_classification: raw ids ``a [SEP] b``; the model adds ``<s>`` and the extract token itself.
classification uses the default pipeline (raw ids): :class:`~chatforge.models.gpt.GPTClassifier`
applies ``<s> text [CLS]`` in ``forward``, so serving and training see the same input.

Labels are pre-shifted (aligned with the logits) and -100 where ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from chatforge.data import Example
from chatforge.tasks import (
    IGNORE_INDEX,
    ClassificationDataset,
    TaskDataError,
    TaskSpec,
    register_task,
    source_ids,
)
from chatforge.tokenizer import Tokenizer


def delimiter_id(tok: Tokenizer) -> int:
    """``[SEP]``, or </s> for vocabularies without one (GPT-2's); the model uses the same rule."""
    return tok.special.sep if tok.special.sep is not None else tok.special.eos


class CausalLMDataset(Dataset):
    """(input_ids, labels) pairs for decoder-only training; labels aligned with positions."""

    def __init__(self, items: list[tuple[list[int], list[int]]], pad_id: int):
        self.items = items
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def collate(self, batch):
        width = max(len(x) for x, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            input_ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
        return {"input_ids": input_ids, "labels": labels}


def _shifted(seq: list[int], answer_from: int = 0) -> tuple[list[int], list[int]]:
    """seq -> (seq[:-1], seq[1:]) with labels before position ``answer_from - 1`` ignored."""
    x, y = seq[:-1], seq[1:]
    y = [IGNORE_INDEX if i < answer_from - 1 else t for i, t in enumerate(y)]
    return x, y


@register_task("lm", family="gpt", generates=True)
def _lm(spec: TaskSpec, examples: Sequence[Example], tok: Tokenizer) -> Dataset:
    texts = [(e.text, spec.max_source_len) for e in examples]
    texts += [(e.response, spec.max_target_len) for e in examples if e.response]
    items = []
    for ids, (_, limit) in zip(tok.encode_batch([t for t, _ in texts]), texts, strict=True):
        if ids:
            items.append(_shifted(ids[: max(1, limit - 1)] + [tok.eos_id]))
    if not items:
        raise TaskDataError("task 'lm' found no non-empty text to train on")
    return CausalLMDataset(items, tok.pad_id)


@register_task("generation", family="gpt", generates=True)
def _generation(spec: TaskSpec, examples: Sequence[Example], tok: Tokenizer) -> Dataset:
    missing = [e.source or repr(e.text) for e in examples if not e.response]
    if missing:
        raise TaskDataError(
            f"task 'generation' needs a response for every example; {len(missing)} have none, e.g. {missing[:3]}"
        )
    sep = delimiter_id(tok)
    items = []
    for q, a in zip(source_ids(tok, examples, spec.max_source_len, spec.context_turns),
                    tok.encode_batch([e.response for e in examples]), strict=True):
        q = q or [tok.unk_id]
        prompt = [tok.bos_id, *q, sep]
        items.append(_shifted(prompt + a[: spec.max_target_len - 1] + [tok.eos_id], answer_from=len(prompt)))
    return CausalLMDataset(items, tok.pad_id)


class PairClassificationDataset(ClassificationDataset):
    """``a [SEP] b`` raw ids + label index (the model wraps them in ``<s> ... [CLS]``)."""

    def __init__(self, examples: Sequence[Example], tok: Tokenizer, labels: list[str], max_a: int, max_b: int):
        missing = [e.source or repr(e.text) for e in examples if not e.response]
        if missing:
            raise TaskDataError(
                f"task 'pair_classification' needs a second text (response) for every example; "
                f"{len(missing)} have none, e.g. {missing[:3]}"
            )
        super().__init__(examples, tok, labels, max_a)
        sep = delimiter_id(tok)
        bs = tok.encode_batch([e.response for e in examples])
        self.items = [(a + [sep] + (b[:max_b] or [tok.unk_id]), y) for (a, y), b in zip(self.items, bs, strict=True)]


@register_task("pair_classification", family="gpt", needs_labels=True)
def _pair_classification(spec: TaskSpec, examples: Sequence[Example], tok: Tokenizer) -> Dataset:
    assert spec.labels is not None
    return PairClassificationDataset(examples, tok, spec.labels, spec.max_source_len, spec.max_target_len)
