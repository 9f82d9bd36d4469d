"""data.split 'predefined' names lists of a CLINC150 JSON file; on a CSV/TSV/JSONL file the readers have no lists,
and every example used to land in both train and valid (validation on the training set, silently)."""

from __future__ import annotations

import pytest
from tests.test_oos import intent_cfg

from chatforge.config import ConfigError, validate_config
from chatforge.evaluation.evaluate import select_examples
from chatforge.training.run import load_splits


def _csv(path):
    path.write_text("text,label\nwill it rain,weather\nbook a flight,flight\nplay a song,music\n", encoding="utf-8")
    return path


def test_a_predefined_split_of_a_csv_file_is_refused(tmp_path):
    tree = intent_cfg(tmp_path)
    tree["data"] = {"path": str(_csv(tmp_path / "x.csv")), "split": "predefined"}
    with pytest.raises(ConfigError, match=r"'predefined' reads the train_keys/valid_keys lists.*is csv"):
        load_splits(validate_config(tree))


def test_evaluating_a_predefined_bundle_on_a_csv_file_reads_it_once(tmp_path):
    cfg = validate_config(intent_cfg(tmp_path))
    examples, name, _ = select_examples(cfg, _csv(tmp_path / "x.csv"), split="all")
    assert name == "all" and [e.label for e in examples] == ["weather", "flight", "music"]
