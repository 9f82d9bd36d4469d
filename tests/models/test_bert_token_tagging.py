"""BERT token classification from YAML: data.format tagged_jsonl -> run_experiment -> bundle -> tags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatforge.bundle import load_bundle
from chatforge.config import ConfigError, apply_overrides, load_config, validate_config
from chatforge.models.bert.pipeline import (
    TaggedExample,
    load_tagged_examples,
    tag_words,
    tagged_label_set,
)
from chatforge.tasks import TaskDataError, get_task, label_set
from chatforge.training.run import run_experiment

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "fixtures" / "tagged_ner_sample.jsonl"


def _tree(tmp_path, **data) -> dict:
    return {
        "name": "tiny-bert-tagging", "seed": 0,
        "data": {"path": str(SAMPLE), "format": "tagged_jsonl", "valid_fraction": 0.1, "test_fraction": 0.1,
                 **data},
        "tokenizer": {"vocab_size": 200, "on_vocab_too_large": "lower"},
        "model": {"family": "bert", "task": "token_classification", "d_model": 32, "n_heads": 2,
                  "num_layers": 1, "d_ff": 64, "max_len": 32, "dropout": 0.0},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 8, "lr": 1e-3, "max_source_len": 24},
        "output": {"dir": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }


def test_task_hooks_load_tagged_file_and_tag_set():
    td = get_task("token_classification", "bert")
    assert td.needs_labels and td.load is not None and td.labels is not None
    ex = load_tagged_examples(SAMPLE)
    assert len(ex) == 40 and all(isinstance(e, TaggedExample) for e in ex)
    assert ex[0].tokens[:2] == ("내일", "서울") and ex[0].tags[:2] == ("B-TIME", "B-LOC")
    assert ex[0].text == " ".join(ex[0].tokens) and ex[0].source.endswith(":1")
    tags = td.label_set(ex)
    assert tags[0] == "O" and set(tags) == {"O", "B-PER", "B-LOC", "I-LOC", "B-TIME", "I-TIME"}
    # Tasks without hooks keep the old behaviour.
    assert get_task("classification").label_set is not None and get_task("classification").load is None
    with pytest.raises(TaskDataError, match="no tags"):
        tagged_label_set([TaggedExample(text="a b")])
    with pytest.raises(TaskDataError, match="needs a label"):
        label_set([TaggedExample(text="a b")])


def test_wrong_format_combinations_fail_clearly(tmp_path):
    with pytest.raises(TaskDataError, match="reads data.format 'tagged_jsonl'.*got data.format 'csv'"):
        run_experiment(validate_config(_tree(tmp_path, format="csv")), run_dir=tmp_path / "a")
    tree = _tree(tmp_path)
    tree["model"]["task"] = "classification"
    with pytest.raises(ConfigError, match="'tagged_jsonl' is for task token_classification"):
        run_experiment(validate_config(tree), run_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="predefined"):
        run_experiment(validate_config(_tree(tmp_path, split="predefined")), run_dir=tmp_path / "c")


def test_run_experiment_bundle_and_tagging(tmp_path):
    res = run_experiment(validate_config(_tree(tmp_path)), run_dir=tmp_path / "run")
    assert res.metrics["steps"] == 3 and res.metrics["train_examples"] > 0
    labels = json.loads((res.bundle_dir / "labels.json").read_text(encoding="utf-8"))
    labels = labels["labels"] if isinstance(labels, dict) else labels
    assert set(labels) == {"O", "B-PER", "B-LOC", "I-LOC", "B-TIME", "I-TIME"}
    b = load_bundle(res.bundle_dir)
    assert b.task == "token_classification" and list(b.labels) == labels
    words = ["내일", "서울", "에서", "Alice", "를", "만나요"]
    tags = tag_words(b.model, b.tokenizer, words, b.labels, max_len=24)
    assert len(tags) == len(words) and set(tags) <= set(labels)
    # The bundle's model tags exactly as the trained one: same weights, same answer.
    again = tag_words(load_bundle(res.bundle_dir).model, b.tokenizer, words, b.labels, max_len=24)
    assert again == tags
    with pytest.raises(ValueError, match="words is empty"):
        tag_words(b.model, b.tokenizer, [], b.labels)


@pytest.mark.slow
def test_tiny_bert_learns_the_sample_tags(tmp_path):
    torch.manual_seed(0)
    tree = apply_overrides(_tree(tmp_path), ["train.max_steps=250", "train.epochs=60", "train.lr=5e-3",
                                              "data.valid_fraction=0.0", "data.test_fraction=0.0"])
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "run")
    b = load_bundle(res.bundle_dir)
    ex = load_tagged_examples(SAMPLE)
    right = sum(tag_words(b.model, b.tokenizer, list(e.tokens), b.labels) == list(e.tags) for e in ex)
    assert right >= 36, f"only {right}/40 training sentences tagged exactly"


def test_shipped_config_validates_with_user_path():
    cfg = load_config(REPO / "configs" / "bert_token_tagging.yaml", [f"data.path={SAMPLE}"])
    assert cfg.data.format == "tagged_jsonl" and cfg.model.task == "token_classification"
