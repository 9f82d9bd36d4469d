"""Deterministic train/valid/test splits that do not move when a corpus grows."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from chatforge.data.readers import DataError, Example

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    """The three parts of a corpus; each keeps the input order of its examples."""

    train: list[Example] = field(default_factory=list)
    valid: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


def example_key(example: Example) -> tuple[str, str | None]:
    """What identifies an example for splitting: its text and response (not its label or source)."""
    return example.text, example.response


def stable_unit(seed: int, example: Example) -> float:
    """A number in [0, 1) fixed by ``(seed, text, response)``: the same on every machine and run.

    blake2b, not ``hash()``: Python salts ``hash`` of str per process.
    """
    text, response = example_key(example)
    # \x1f separates fields and \x00 marks a missing response, so ("a", None) != ("a", "").
    tail = "\x00" if response is None else response
    payload = f"{seed}\x1f{text}\x1f{tail}".encode()
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _check_fractions(valid_fraction: float, test_fraction: float) -> None:
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise DataError(f"{name} must be a number in [0, 1), got {value!r}")
    if valid_fraction + test_fraction >= 1:
        raise DataError(
            f"valid_fraction + test_fraction must be < 1 so that something is left to train on, "
            f"got {valid_fraction} + {test_fraction} = {valid_fraction + test_fraction}"
        )


def split_examples(
    examples: Sequence[Example],
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    stratify: bool = False,
) -> Splits:
    """Split examples into train/valid/test, deterministically for a seed.

    Method (unstratified): each example gets ``u = stable_unit(seed, example)``, a hash of
    ``(seed, text, response)`` mapped to [0, 1); ``u < test_fraction`` goes to test,
    ``u < test_fraction + valid_fraction`` to valid, the rest to train. Hence:

    * the split of an example depends only on the seed and the example, never on input order
      or on the other examples, so appending rows to a corpus never moves existing ones;
    * duplicates (same text and response) always land together, so an exact duplicate never
      leaks from train into valid/test;
    * sizes match the fractions in expectation, not exactly (a small corpus may get a few more
      or fewer valid/test examples than ``fraction * n``).

    Method (``stratify=True``): per label, the distinct ``(text, response)`` keys are ordered by
    their hash and the first ``round(test_fraction * n_label)`` examples go to test, the next
    ``round(valid_fraction * n_label)`` to valid (whole duplicate groups at a time). Each label
    thus keeps its proportion in every part, exactly up to rounding, still independent of input
    order. The price: when a label grows, examples near the cut may move between parts. Examples
    without a label form their own stratum.

    Each part keeps the input order of its examples.
    """
    _check_fractions(valid_fraction, test_fraction)
    assignment: dict[int, str] = {}
    if not stratify:
        for i, example in enumerate(examples):
            u = stable_unit(seed, example)
            assignment[i] = (
                "test" if u < test_fraction else "valid" if u < test_fraction + valid_fraction else "train"
            )
    else:
        by_label: dict[str | None, dict[tuple[str, str | None], list[int]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for i, example in enumerate(examples):
            by_label[example.label][example_key(example)].append(i)
        for groups in by_label.values():
            n = sum(len(members) for members in groups.values())
            n_test = round(test_fraction * n)
            n_valid = round(valid_fraction * n)
            # Ties in the 64-bit hash are astronomically rare; the key breaks them deterministically.
            ordered = sorted(groups, key=lambda k: (stable_unit(seed, Example(k[0], k[1])), k[0], k[1] or ""))
            done = 0
            for key in ordered:
                part = "test" if done < n_test else "valid" if done < n_test + n_valid else "train"
                for i in groups[key]:
                    assignment[i] = part
                done += len(groups[key])
    splits = Splits()
    for i, example in enumerate(examples):
        getattr(splits, assignment[i]).append(example)
    logger.info("split %d examples (seed %d, stratify=%s): %s", len(examples), seed, stratify, splits.sizes())
    for name, fraction in (("valid", valid_fraction), ("test", test_fraction)):
        if fraction > 0 and examples and not getattr(splits, name):
            logger.warning(
                "%s split is empty although %s_fraction=%s; the corpus may be too small", name, name, fraction
            )
    return splits


def near_duplicate_groups(texts: Sequence[str], similarity: float) -> list[list[int]]:
    """Indices of ``texts`` grouped by near-duplication: connected components of the graph whose edges join
    texts with a cosine similarity >= ``similarity`` over sublinear TF-IDF of char_wb 2-5-grams."""
    # lazy: scikit-learn and scipy take seconds to import; only grouped dev splits need them
    from scipy.sparse.csgraph import connected_components
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(texts) < 2:
        return [[i] for i in range(len(texts))]
    x = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True).fit_transform(texts)
    sim = x @ x.T
    sim.data = (sim.data >= similarity - 1e-9).astype(np.int8)
    sim.eliminate_zeros()
    _, comp = connected_components(sim, directed=False)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(comp):
        groups[int(c)].append(i)
    return list(groups.values())


def hold_out_tail(examples: Sequence[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """(kept, held out): the last ``round(fraction * n)`` of each label's ``n`` examples, in input order.

    For lists kept in collection order (CLINC150: one crowd worker's paraphrases of a prompt in a run), a
    contiguous tail shares a single cut with training per label, so few held-out examples have a sibling by
    the same writer in training, as for a list collected separately (the official val and test lists). Whole
    duplicate groups (same text and response within a label) move together: an example whose twin sits
    earlier in the list is held out with it, so an exact duplicate never straddles the cut.
    """
    _check_fractions(0.0, fraction)
    by_label: dict[str | None, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_label[e.label].append(i)
    held: set[int] = set()
    for idx in by_label.values():
        twins: dict[tuple[str, str | None], list[int]] = defaultdict(list)
        for i in idx:
            twins[example_key(examples[i])].append(i)
        want, got = round(fraction * len(idx)), 0
        for i in reversed(idx):
            if got >= want:
                break
            if i not in held:
                group = twins[example_key(examples[i])]
                held.update(group)
                got += len(group)
    kept = [e for i, e in enumerate(examples) if i not in held]
    out = [e for i, e in enumerate(examples) if i in held]
    logger.info("held out the last %d of %d examples per label (fraction %s, file order)", len(out), len(examples),
                fraction)
    return kept, out


def hold_out(examples: Sequence[Example], fraction: float, seed: int = 0,
             group_similarity: float | None = None, order: str = "hashed") -> tuple[list[Example], list[Example]]:
    """(kept, held out): ``fraction`` of each label's examples held out, in an order fixed by ``seed``
    (``order="hashed"``), or the last ones in input order (``order="tail"``, :func:`hold_out_tail`).

    Without ``group_similarity`` this is ``split_examples(..., test_fraction=fraction, stratify=True)``.
    With it, near-duplicates of one label (:func:`near_duplicate_groups`) are held out or kept together,
    whole groups in hash order until the label's share is reached (so a label may give one group more).
    Why: crowd-sourced intent data is full of paraphrases of one prompt; held out one by one, each has
    a sibling in training and the held-out score is optimistic (on CLINC150, 17 % of a plain 20 % dev
    split has a training text at cosine >= 0.9, against 11 % of the official val list).
    """
    if order not in ("hashed", "tail"):
        raise DataError(f"dev split order must be 'hashed' or 'tail', got {order!r}")
    if order == "tail":
        if group_similarity is not None:
            raise DataError("group_similarity groups a hashed dev split; a tail split holds out contiguous runs")
        return hold_out_tail(examples, fraction)
    _check_fractions(0.0, fraction)
    if group_similarity is None:
        s = split_examples(examples, valid_fraction=0.0, test_fraction=fraction, seed=seed, stratify=True)
        return s.train, s.test
    by_label: dict[str | None, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_label[e.label].append(i)
    held: set[int] = set()
    for idx in by_label.values():
        groups = [[idx[j] for j in g] for g in near_duplicate_groups([examples[i].text for i in idx], group_similarity)]
        groups.sort(key=lambda g: min((stable_unit(seed, examples[i]), examples[i].text) for i in g))
        want, got = round(fraction * len(idx)), 0
        for g in groups:
            if got >= want:
                break
            held.update(g)
            got += len(g)
    kept = [e for i, e in enumerate(examples) if i not in held]
    out = [e for i, e in enumerate(examples) if i in held]
    logger.info("held out %d of %d examples (fraction %s, near-duplicates >= %s together)", len(out), len(examples),
                fraction, group_similarity)
    return kept, out


def fold_ids(examples: Sequence[Example], folds: int, seed: int = 0) -> list[int]:
    """The cross-fitting fold (0 .. folds-1) of each example: per label, whole duplicate groups (same text and
    response) in the order of their hash under ``seed``, dealt to the folds in turn, so each label is spread evenly
    and an exact duplicate never sits in two folds. Depends on the examples, not on their order."""
    if folds < 2:
        raise DataError(f"folds must be >= 2, got {folds}")
    by_label: dict[str | None, dict[tuple[str, str | None], list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, e in enumerate(examples):
        by_label[e.label][example_key(e)].append(i)
    out = [0] * len(examples)
    for groups in by_label.values():
        ordered = sorted(groups, key=lambda k: (stable_unit(seed, Example(k[0], k[1])), k[0], k[1] or ""))
        for n, key in enumerate(ordered):
            for i in groups[key]:
                out[i] = n % folds
    return out
