"""Task pipelines: examples -> the tensors the trainer feeds (built by hand here from the tokenizer's
ids), the task registry's lookup rules, and the data errors that name the offending examples."""

import pytest
import torch

from chatforge import tasks
from chatforge.data import Example
from chatforge.tasks import (
    IGNORE_INDEX,
    TaskDataError,
    TaskSpec,
    get_task,
    label_set,
    make_dataset,
    register_task,
)
from chatforge.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _padded(rows, fill):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows])


def test_generation_batch_is_source_and_shifted_target():
    exs = [Example("hi", response="yo"), Example("hello", response="a")]
    ds = make_dataset(TaskSpec("generation"), exs, TOK)
    batch = ds.collate([ds[0], ds[1]])
    targets = [[TOK.bos_id, *TOK.encode(e.response), TOK.eos_id] for e in exs]
    torch.testing.assert_close(batch["input_ids"], _padded([TOK.encode(e.text) for e in exs], TOK.pad_id))
    torch.testing.assert_close(batch["decoder_input_ids"], _padded([t[:-1] for t in targets], TOK.pad_id))
    torch.testing.assert_close(batch["labels"], _padded([t[1:] for t in targets], IGNORE_INDEX))


def test_generation_truncates_and_keeps_both_ends_of_the_target():
    ds = make_dataset(TaskSpec("generation", max_source_len=3, max_target_len=4), [Example("abcdef", "uvwxyz")], TOK)
    src, tgt = ds[0]
    assert src == TOK.encode("abcdef")[:3]
    assert tgt == [TOK.bos_id, *TOK.encode("uvwxyz")[:2], TOK.eos_id]


def test_generation_without_responses_names_the_examples():
    with pytest.raises(TaskDataError, match=r"needs a response for every example; 1 have none, e.g. \['f.tsv:2'\]"):
        make_dataset(TaskSpec("generation"), [Example("a", "b"), Example("c", source="f.tsv:2")], TOK)


def test_classification_batch_is_padded_ids_and_label_indices():
    exs = [Example("no", label="bye"), Example("hello", label="greet")]
    spec = TaskSpec("classification", labels=["bye", "greet"])
    ds = make_dataset(spec, exs, TOK)
    batch = ds.collate([ds[1], ds[0]])
    torch.testing.assert_close(batch["input_ids"], _padded([TOK.encode("hello"), TOK.encode("no")], TOK.pad_id))
    assert batch["labels"].tolist() == [1, 0]
    with pytest.raises(TaskDataError, match=r"labels \['oos'\] are not among the model's 2 labels"):
        make_dataset(spec, [Example("x", label="oos")], TOK)


def test_label_set_is_sorted_and_refuses_missing_or_single_labels():
    assert label_set([Example("a", label="b"), Example("c", label="a"), Example("d", label="b")]) == ["a", "b"]
    with pytest.raises(TaskDataError, match="1 have none"):
        label_set([Example("a", label="x"), Example("b", label="y"), Example("c", source="f:3")])
    with pytest.raises(TaskDataError, match=r"at least 2 distinct labels, found \['x'\]"):
        label_set([Example("a", label="x")])


def test_family_pipeline_takes_precedence_and_unknown_tasks_list_the_known(monkeypatch):
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))

    @register_task("classification", family="toy", needs_labels=True)
    def _toy(spec, examples, tok):
        return "toy dataset"

    assert get_task("classification", "toy").build is _toy
    assert get_task("classification", "other").build is not _toy  # falls back to the default pipeline
    with pytest.raises(ValueError, match="already registered"):
        register_task("classification", family="toy")(_toy)
    with pytest.raises(TaskDataError, match="unknown task 'nope'; known tasks: .*classification, .*generation"):
        get_task("nope")
