from __future__ import annotations

import random
from collections import Counter

import pytest

from chatforge.data import DataError, Example, split_examples


def corpus(n: int, labels: tuple[str, ...] = ("a", "b", "c"), start: int = 0) -> list[Example]:
    return [Example(f"question {i}", f"answer {i}", labels[i % len(labels)], f"f:{i}") for i in range(start, n)]


def membership(splits) -> dict[str, set[tuple[str, str | None]]]:
    return {name: {(e.text, e.response) for e in getattr(splits, name)} for name in ("train", "valid", "test")}


def test_sizes_and_partition():
    examples = corpus(2000)
    splits = split_examples(examples, valid_fraction=0.1, test_fraction=0.2, seed=1)
    assert len(splits.train) + len(splits.valid) + len(splits.test) == 2000
    parts = membership(splits)
    assert not parts["train"] & parts["valid"] and not parts["train"] & parts["test"]
    # Hash thresholds give the fractions in expectation; 2000 examples keep them within a few percent.
    assert 150 <= len(splits.valid) <= 250 and 340 <= len(splits.test) <= 460


def test_same_seed_same_split_regardless_of_order():
    examples = corpus(500)
    shuffled = examples[:]
    random.Random(7).shuffle(shuffled)
    a = split_examples(examples, seed=3)
    b = split_examples(shuffled, seed=3)
    assert membership(a) == membership(b)
    # Each part keeps its input order.
    assert a.train == [e for e in examples if e in set(a.train)]


def test_different_seed_different_split():
    examples = corpus(500)
    assert membership(split_examples(examples, seed=0)) != membership(split_examples(examples, seed=1))


def test_growing_the_corpus_does_not_move_existing_examples():
    small = corpus(300)
    grown = corpus(300) + corpus(900, start=300)
    before, after = membership(split_examples(small, seed=5)), membership(split_examples(grown, seed=5))
    for name in before:
        assert before[name] <= after[name]


def test_duplicates_land_together():
    examples = corpus(200) * 3
    parts = membership(split_examples(examples, seed=2))
    splits = split_examples(examples, seed=2)
    assert sum(len(v) for v in parts.values()) == 200
    assert len(splits.test) % 3 == 0 and len(splits.valid) % 3 == 0


def test_stratified_keeps_label_proportions():
    # Unbalanced labels: 600 a, 300 b, 100 c.
    examples = [Example(f"q{i}", f"r{i}", "a" if i < 600 else "b" if i < 900 else "c") for i in range(1000)]
    splits = split_examples(examples, valid_fraction=0.1, test_fraction=0.2, seed=0, stratify=True)
    assert Counter(e.label for e in splits.test) == {"a": 120, "b": 60, "c": 20}
    assert Counter(e.label for e in splits.valid) == {"a": 60, "b": 30, "c": 10}
    assert Counter(e.label for e in splits.train) == {"a": 420, "b": 210, "c": 70}
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    again = split_examples(shuffled, valid_fraction=0.1, test_fraction=0.2, seed=0, stratify=True)
    assert membership(again) == membership(splits)
    assert membership(split_examples(examples, 0.1, 0.2, seed=9, stratify=True)) != membership(splits)


def test_stratified_unlabelled_is_its_own_stratum():
    examples = [Example(f"q{i}") for i in range(50)] + corpus(50, labels=("x",))
    splits = split_examples(examples, valid_fraction=0.2, test_fraction=0.2, stratify=True)
    assert Counter(e.label for e in splits.test) == {None: 10, "x": 10}


def test_zero_fractions_put_everything_in_train():
    examples = corpus(50)
    splits = split_examples(examples, valid_fraction=0, test_fraction=0)
    assert splits.train == examples and not splits.valid and not splits.test


@pytest.mark.parametrize(
    ("valid", "test", "message"),
    [
        (-0.1, 0.1, r"valid_fraction must be a number in \[0, 1\), got -0.1"),
        (0.1, 1.0, r"test_fraction must be a number in \[0, 1\), got 1.0"),
        (0.5, 0.5, r"valid_fraction \+ test_fraction must be < 1"),
        ("0.1", 0.1, r"valid_fraction must be a number"),
    ],
)
def test_bad_fractions(valid, test, message):
    with pytest.raises(DataError, match=message):
        split_examples(corpus(10), valid_fraction=valid, test_fraction=test)
