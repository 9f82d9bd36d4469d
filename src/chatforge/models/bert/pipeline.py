"""BERT input pipelines (Devlin et al. 2019, section 3 and appendix A.1).

Every BERT input is ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` with segment (token type) ids
0 for ``[CLS] a [SEP]`` and 1 for ``b [SEP]``. The special ids come from the tokenizer's
:class:`~chatforge.registry.SpecialIds`, never from literals.

Tasks registered for family ``bert``:

``mlm_nsp``
    Pre-training. Each example's (text, response) is a sentence pair: with probability 0.5 the
    response is kept ("is next", NSP label 0, as in HF), otherwise replaced by the response of a
    random *other* example (label 1). Then 15% of the non-special tokens of each sequence are
    selected for masked LM; of those 80% become ``[MASK]``, 10% a random non-special token and
    10% stay unchanged (section 3.1, appendix A.1). Pairing and masking are redrawn for every
    batch (dynamic, as RoBERTa found slightly better than BERT's static copies).
``mlm``
    Masked LM alone, on single sentences ``[CLS] text [SEP]``: every text of the data (and every
    response, as a sentence of its own) is one sequence, masked as above. For corpora without
    sentence pairs (intent queries, ``data.unlabelled`` text); RoBERTa (Liu et al. 2019) found
    dropping NSP no worse. The pooler gets no pre-training signal (it is NSP's).
``classification``
    ``[CLS] text [SEP]`` -> label.
``pair_classification``
    ``[CLS] text [SEP] response [SEP]`` -> label (e.g. does this answer fit this question).
``token_classification``
    One tag per whitespace word; a word's tag goes on its first sub-token, the other sub-tokens
    are ignored (-100), as in the paper's NER setup (section 5.3). See :func:`read_tagged_jsonl`
    for the file format and :class:`TokenTaggingDataset`. From YAML: ``data.format: tagged_jsonl``;
    the run driver reads the file through this task's ``load`` hook into :class:`TaggedExample`
    and takes the bundle's labels.json from the tags seen in training (``labels`` hook).
    :func:`tag_words` tags a sentence with a trained model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from chatforge.data import Example
from chatforge.tasks import IGNORE_INDEX, TaskDataError, TaskSpec, register_task
from chatforge.tokenizer import SpecialIds

logger = logging.getLogger(__name__)

MLM_PROBABILITY = 0.15  # paper, section 3.1
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # of the selected tokens; the remaining 0.1 stay unchanged
NSP_RANDOM_PROBABILITY = 0.5


def require_bert_specials(special: SpecialIds, what: str = "BERT") -> tuple[int, int]:
    """(cls, sep) ids, or a clear error when the tokenizer lacks them."""
    if special.cls is None or special.sep is None:
        raise TaskDataError(
            f"{what} needs a tokenizer with [CLS] and [SEP] pieces (got cls={special.cls}, sep={special.sep}); "
            "train one with `chatforge tokenizer train` or use a BERT checkpoint's tokenizer"
        )
    return special.cls, special.sep


def truncate_pair(a: list[int], b: list[int] | None, max_tokens: int) -> tuple[list[int], list[int] | None]:
    """Trim the longer of the two sequences one token at a time until both fit (BERT's
    ``_truncate_seq_pair``), so a long answer does not squeeze out the whole question."""
    if b is None:
        return a[:max_tokens], None
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def encode_pair(a: list[int], b: list[int] | None, special: SpecialIds, max_len: int,
                unk_id: int | None = None) -> tuple[list[int], list[int]]:
    """``[CLS] a [SEP] (b [SEP])`` and its segment ids, at most ``max_len`` tokens."""
    cls, sep = require_bert_specials(special)
    room = max_len - (3 if b is not None else 2)
    if room < 1:
        raise TaskDataError(f"max length {max_len} leaves no room for text between [CLS]/[SEP]")
    unk = special.unk if unk_id is None else unk_id
    a, b = truncate_pair(a or [unk], (b or [unk]) if b is not None else None, room)
    ids = [cls, *a, sep]
    segments = [0] * len(ids)
    if b is not None:
        ids += [*b, sep]
        segments += [1] * (len(b) + 1)
    return ids, segments


def pad_batch(seqs: Sequence[list[int]], segments: Sequence[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest row -> input_ids, token_type_ids (B, T)."""
    B, T = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)
    for i, (s, g) in enumerate(zip(seqs, segments, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        token_type_ids[i, : len(g)] = torch.tensor(g, dtype=torch.long)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids}


def special_id_set(special: SpecialIds) -> list[int]:
    return sorted({i for i in (special.pad, special.bos, special.eos, special.unk, special.cls,
                               special.sep, special.mask) if i is not None})


def mask_tokens(
    input_ids: Tensor,
    special: SpecialIds,
    vocab_size: int,
    *,
    probability: float = MLM_PROBABILITY,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masked-LM corruption (section 3.1): returns (corrupted ids, labels), both (B, T).

    In each row, ``max(1, round(probability * n))`` of its ``n`` candidate tokens are selected
    (as the reference ``create_pretraining_data.py`` does); candidates are all tokens except
    [CLS], [SEP], [MASK], padding, <s>, </s> (and <unk> stays a candidate: it is text). Of the selected,
    80% -> [MASK], 10% -> a random non-special token (not <unk> either), 10% unchanged. Labels hold the original id
    at selected positions and -100 everywhere else.
    """
    if special.mask is None:
        raise TaskDataError("masked LM needs a tokenizer with a [MASK] piece; this one has none")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"masking probability must be in (0, 1); got {probability}")
    never = torch.tensor([i for i in special_id_set(special) if i != special.unk], dtype=torch.long)
    candidate = ~torch.isin(input_ids, never)  # (B, T)
    n_cand = candidate.sum(1)  # (B,)
    n_select = torch.where(n_cand > 0, (n_cand.double() * probability).round().long().clamp(min=1), 0)
    # A random rank per candidate; the n_select lowest ranks are chosen (exact count per row).
    scores = torch.rand(input_ids.shape, generator=generator)
    scores = scores.masked_fill(~candidate, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, T)
    selected = ranks < n_select[:, None]
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    r = torch.rand(input_ids.shape, generator=generator)
    to_mask = selected & (r < MASK_FRACTION)
    to_random = selected & (r >= MASK_FRACTION) & (r < MASK_FRACTION + RANDOM_FRACTION)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in special_id_set(special) if i < vocab_size]] = False
    allowed_ids = allowed.nonzero().squeeze(1)  # random replacements never insert special tokens
    random_ids = allowed_ids[torch.randint(len(allowed_ids), input_ids.shape, generator=generator)]
    out = torch.where(to_mask, torch.full_like(input_ids, special.mask), input_ids)
    out = torch.where(to_random, random_ids, out)
    return out, labels


# --------------------------------------------------------------------------------------------- datasets


class BertPretrainingDataset(Dataset):
    """Sentence pairs for MLM + NSP; negatives and masks are drawn at collate time."""

    def __init__(self, examples: Sequence[Example], special: SpecialIds, vocab_size: int, encode_batch,
                 max_len: int, *, generator: torch.Generator | None = None):
        missing = [e.source or repr(e.text) for e in examples if not e.response]
        if missing:
            raise TaskDataError(
                f"task 'mlm_nsp' needs sentence pairs (text + response) for next sentence prediction; "
                f"{len(missing)} example(s) have no response, e.g. {missing[:3]}"
            )
        if len(examples) < 2:
            raise TaskDataError("task 'mlm_nsp' needs at least 2 examples to draw random next sentences")
        require_bert_specials(special, "task 'mlm_nsp'")
        if special.mask is None:
            raise TaskDataError("task 'mlm_nsp' needs a tokenizer with a [MASK] piece")
        self.a = encode_batch([e.text for e in examples])
        self.b = encode_batch([e.response for e in examples])
        self.special, self.vocab_size, self.max_len = special, vocab_size, max_len
        self.generator = generator

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, batch: list[int]) -> dict[str, Tensor]:
        n = len(self.a)
        g = self.generator
        is_random = torch.rand(len(batch), generator=g) < NSP_RANDOM_PROBABILITY
        # Offset in [1, n) so the "random next sentence" is never the example's own response.
        other = torch.randint(1, n, (len(batch),), generator=g)
        seqs, segs = [], []
        for k, i in enumerate(batch):
            j = (i + int(other[k])) % n if is_random[k] else i
            ids, seg = encode_pair(self.a[i], self.b[j], self.special, self.max_len)
            seqs.append(ids)
            segs.append(seg)
        out = pad_batch(seqs, segs, self.special.pad)
        out["input_ids"], out["labels"] = mask_tokens(out["input_ids"], self.special, self.vocab_size,
                                                      generator=g)
        out["next_sentence_label"] = is_random.long()  # HF convention: 0 = is next, 1 = random
        return out


class BertMaskedLMDataset(Dataset):
    """Single sentences for masked LM alone (task ``mlm``); masks are drawn at collate time."""

    def __init__(self, examples: Sequence[Example], special: SpecialIds, vocab_size: int, encode_batch,
                 max_len: int, *, generator: torch.Generator | None = None):
        texts = [e.text for e in examples] + [e.response for e in examples if e.response]
        if not texts:
            raise TaskDataError("task 'mlm' needs at least one text")
        require_bert_specials(special, "task 'mlm'")
        if special.mask is None:
            raise TaskDataError("task 'mlm' needs a tokenizer with a [MASK] piece")
        self.seqs = encode_batch(texts)
        self.special, self.vocab_size, self.max_len = special, vocab_size, max_len
        self.generator = generator

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, batch: list[int]) -> dict[str, Tensor]:
        seqs, segs = [], []
        for i in batch:
            ids, seg = encode_pair(self.seqs[i], None, self.special, self.max_len)
            seqs.append(ids)
            segs.append(seg)
        out = pad_batch(seqs, segs, self.special.pad)
        out["input_ids"], out["labels"] = mask_tokens(out["input_ids"], self.special, self.vocab_size,
                                                      generator=self.generator)
        return out


class BertClassificationDataset(Dataset):
    """``[CLS] text [SEP]`` (or ``[CLS] text [SEP] response [SEP]`` when ``pairs``) -> label index."""

    def __init__(self, examples: Sequence[Example], special: SpecialIds, encode_batch, labels: list[str],
                 max_len: int, *, pairs: bool = False):
        task = "pair_classification" if pairs else "classification"
        index = {lab: i for i, lab in enumerate(labels)}
        unknown = sorted({e.label for e in examples if e.label not in index}, key=str)
        if unknown:
            raise TaskDataError(f"labels {unknown[:10]} are not among the model's {len(labels)} labels "
                                f"{labels[:10]}")
        if pairs:
            missing = [e.source or repr(e.text) for e in examples if not e.response]
            if missing:
                raise TaskDataError(f"task {task!r} needs a second text (response) for every example; "
                                    f"{len(missing)} have none, e.g. {missing[:3]}")
        a = encode_batch([e.text for e in examples])
        b = encode_batch([e.response for e in examples]) if pairs else [None] * len(a)
        self.items = []
        for x, y, e in zip(a, b, examples, strict=True):
            ids, seg = encode_pair(x, y, special, max_len)
            self.items.append((ids, seg, index[e.label]))
        self.pad_id = special.pad

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def collate(self, batch) -> dict[str, Tensor]:
        out = pad_batch([b[0] for b in batch], [b[1] for b in batch], self.pad_id)
        out["labels"] = torch.tensor([b[2] for b in batch], dtype=torch.long)
        return out


def read_tagged_jsonl(path: str | Path) -> list[tuple[list[str], list[str]]]:
    """Read a token-tagging file: one JSON object per line, ``{"tokens": [...], "tags": [...]}``.

    ``tokens`` are words (strings), ``tags`` one tag per word (e.g. BIO slots: ``"O"``,
    ``"B-time"``, ``"I-time"``). Errors name the line and what was wrong.
    """
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one object") from None
        toks, tags = (obj.get("tokens"), obj.get("tags")) if isinstance(obj, dict) else (None, None)
        if not (isinstance(toks, list) and isinstance(tags, list) and toks
                and all(isinstance(t, str) for t in toks + tags)):
            raise TaskDataError(f'{path}:{n}: expected {{"tokens": [str, ...], "tags": [str, ...]}}, '
                                f"got {line[:80]!r}")
        if len(toks) != len(tags):
            raise TaskDataError(f"{path}:{n}: {len(toks)} tokens but {len(tags)} tags; need one tag per token")
        out.append((toks, tags))
    return out


@dataclass(frozen=True)
class TaggedExample(Example):
    """A tagged sentence as an :class:`Example`: ``text`` is the words joined by spaces (what the
    tokenizer trains on and the splitter groups duplicates by), ``tokens``/``tags`` the exact
    words and their tags."""

    tokens: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()


def load_tagged_examples(path: str | Path, data: Any = None) -> list[TaggedExample]:
    """The ``load`` hook of ``token_classification``: a :func:`read_tagged_jsonl` file -> examples.

    ``data`` is the run's ``DataConfig``; its format must be ``tagged_jsonl`` (or ``auto``).
    """
    fmt = getattr(data, "format", "tagged_jsonl")
    if fmt not in ("auto", "tagged_jsonl"):
        raise TaskDataError(f"task 'token_classification' reads data.format 'tagged_jsonl' "
                            f'({{"tokens": [...], "tags": [...]}} per line); got data.format {fmt!r}')
    path = Path(path)
    return [TaggedExample(text=" ".join(toks), source=f"{path}:{n}", tokens=tuple(toks), tags=tuple(tags))
            for n, (toks, tags) in enumerate(read_tagged_jsonl(path), start=1)]


def tagged_label_set(examples: Sequence[Example]) -> list[str]:
    """The ``labels`` hook of ``token_classification``: sorted tags of the examples ("O" first)."""
    untagged = [e.source or repr(e.text) for e in examples if not getattr(e, "tags", None)]
    if untagged:
        raise TaskDataError(f"task 'token_classification' needs tagged sentences (data.format: tagged_jsonl); "
                            f"{len(untagged)} example(s) have no tags, e.g. {untagged[:3]}")
    tags = sorted({t for e in examples for t in e.tags}, key=lambda t: (t != "O", t))
    if len(tags) < 2:
        raise TaskDataError(f"task 'token_classification' needs at least 2 distinct tags, found {tags}")
    return tags


class TokenTaggingDataset(Dataset):
    """``[CLS] w1 w2 ... [SEP]`` with a tag index on each word's first sub-token, -100 elsewhere."""

    def __init__(self, sentences: Sequence[tuple[list[str], list[str]]], special: SpecialIds, encode_batch,
                 tags: list[str], max_len: int):
        cls, sep = require_bert_specials(special, "token classification")
        index = {t: i for i, t in enumerate(tags)}
        unknown = sorted({t for _, ts in sentences for t in ts if t not in index})
        if unknown:
            raise TaskDataError(f"tags {unknown[:10]} are not among the model's tags {tags[:20]}")
        self.items = []
        for words, word_tags in sentences:
            ids, labels = [cls], [IGNORE_INDEX]
            for t, pieces in zip(word_tags, encode_batch(list(words)), strict=True):
                pieces = pieces or [special.unk]
                ids += pieces
                labels += [index[t]] + [IGNORE_INDEX] * (len(pieces) - 1)
            ids, labels = ids[: max_len - 1] + [sep], labels[: max_len - 1] + [IGNORE_INDEX]
            self.items.append((ids, labels))
        self.pad_id = special.pad

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def collate(self, batch) -> dict[str, Tensor]:
        out = pad_batch([b[0] for b in batch], [[0] * len(b[0]) for b in batch], self.pad_id)
        labels = torch.full_like(out["input_ids"], IGNORE_INDEX)
        for i, (_, lab) in enumerate(batch):
            labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        out["labels"] = labels
        return out


# --------------------------------------------------------------------------------------------- registry


@register_task("mlm_nsp", family="bert")
def _mlm_nsp(spec: TaskSpec, examples: Sequence[Example], tok) -> Dataset:
    return BertPretrainingDataset(examples, tok.special, tok.vocab_size, tok.encode_batch, spec.max_source_len)


@register_task("mlm", family="bert")
def _mlm(spec: TaskSpec, examples: Sequence[Example], tok) -> Dataset:
    return BertMaskedLMDataset(examples, tok.special, tok.vocab_size, tok.encode_batch, spec.max_source_len)


@register_task("classification", family="bert", needs_labels=True)
def _classification(spec: TaskSpec, examples: Sequence[Example], tok) -> Dataset:
    assert spec.labels is not None
    return BertClassificationDataset(examples, tok.special, tok.encode_batch, spec.labels, spec.max_source_len)


@register_task("pair_classification", family="bert", needs_labels=True)
def _pair_classification(spec: TaskSpec, examples: Sequence[Example], tok) -> Dataset:
    assert spec.labels is not None
    return BertClassificationDataset(examples, tok.special, tok.encode_batch, spec.labels,
                                     spec.max_source_len, pairs=True)


@register_task("token_classification", family="bert", needs_labels=True, load=load_tagged_examples,
               labels=tagged_label_set)
def _token_classification(spec: TaskSpec, examples: Sequence[Example], tok) -> Dataset:
    assert spec.labels is not None
    sentences = [(list(e.tokens), list(e.tags)) for e in examples]
    missing = [e.source or repr(e.text) for e in examples if not getattr(e, "tags", None)]
    if missing:
        raise TaskDataError(f"task 'token_classification' needs tagged sentences; {len(missing)} example(s) "
                            f"have none, e.g. {missing[:3]}")
    return TokenTaggingDataset(sentences, tok.special, tok.encode_batch, spec.labels, spec.max_source_len)


@torch.no_grad()
def tag_words(model, tok, words: Sequence[str], labels: Sequence[str], max_len: int = 128) -> list[str]:
    """Tag each word of ``words`` with a token-classification model: the prediction on the word's
    first sub-token, as in training. Words cut off by ``max_len`` get no tag (the list is shorter)."""
    if not words:
        raise ValueError("words is empty; give at least one word to tag")
    ds = TokenTaggingDataset([(list(words), [labels[0]] * len(words))], tok.special, tok.encode_batch,
                             list(labels), max_len)
    batch = ds.collate([ds[0]])
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"]).logits  # (1, T, C)
    finally:
        model.train(was_training)
    first = batch["labels"][0] != IGNORE_INDEX  # (T,) the first sub-token of each kept word
    return [labels[i] for i in logits[0, first].argmax(-1).tolist()]
