"""ELMo task pipelines: ``lm`` (biLM pre-training on every text of the corpus) and ``classification``.

Both feed plain right-padded token ids (the model adds ``<s>``/``</s>`` itself); the model spells the
ids into characters with the tokenizer it was built with (``BuildContext.tokenizer``).
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
)
from chatforge.tokenizer import Tokenizer


class LanguageModelDataset(Dataset):
    """Sentences for a language model: every example's text and, when present, its response.

    Items are token lists (at most ``max_len`` tokens); ``collate`` gives ``input_ids`` and
    ``labels`` (the same tokens, -100 on padding) — the model shifts them per direction.
    """

    def __init__(self, examples: Sequence[Example], tok: Tokenizer, max_len: int):
        texts = [e.text for e in examples] + [e.response for e in examples if e.response]
        self.items = [ids[:max_len] for ids in tok.encode_batch(texts) if ids]
        if not self.items:
            raise TaskDataError("task 'lm' found no non-empty text to train on")
        self.pad_id = tok.pad_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[int]:
        return self.items[i]

    def collate(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(batch):
            input_ids[i, : len(s)] = labels[i, : len(s)] = torch.tensor(s)
        return {"input_ids": input_ids, "labels": labels}


@register_task("lm", family="elmo")
def _elmo_lm(spec: TaskSpec, examples: Sequence[Example], tok: Tokenizer) -> Dataset:
    return LanguageModelDataset(examples, tok, spec.max_source_len)


@register_task("classification", family="elmo", needs_labels=True)
def _elmo_classification(spec: TaskSpec, examples: Sequence[Example], tok: Tokenizer) -> Dataset:
    if spec.labels is None:
        raise TaskDataError("task 'classification' needs the label set")
    return ClassificationDataset(examples, tok, spec.labels, spec.max_source_len)
