"""`chatforge compare` keeps evaluations of different data files apart: an evaluation of a file other than the
run's training data is the split "SPLIT of FILE". Before, every `chatforge evaluate --data X` of any file under
the same split name (e.g. ``all``: a whole held-out file, or a run's whole training file) was ranked as one split,
so one run's 3 Korean utterances stood against another run's 100 held-out rows."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from chatforge.evaluation.compare import build_leaderboard, collect_runs


def _run(root: Path, name: str, evals: list[tuple[str, str, float]], data_path: str = "/d/train.csv") -> None:
    run = root / name
    run.mkdir(parents=True)
    cfg = {"name": name, "model": {"family": "linear", "task": "classification"},
           "data": {"path": data_path, "split": "random"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text(json.dumps({"valid_accuracy": 0.5}))
    for i, (split, data, acc) in enumerate(evals):
        ev = run / "eval" / f"e{i}"
        ev.mkdir(parents=True)
        (ev / "evaluation.json").write_text(json.dumps({
            "split": split, "data": data, "n": 10, "created": f"2026-01-0{i + 1}T00:00:00+00:00",
            "metrics": {"accuracy": acc}}))


def test_whole_files_of_different_data_are_different_splits(tmp_path):
    _run(tmp_path, "a", [("all", "/x/held_a.csv", 0.9)])
    _run(tmp_path, "b", [("all", "/x/held_b.csv", 0.4), ("all", "/d/train.csv", 0.99)])
    _run(tmp_path, "c", [("all", "/y/held_a.csv", 0.7), ("test", "/d/train.csv", 0.6)])
    runs = collect_runs(runs_dir=tmp_path)
    lb = build_leaderboard(runs, metric="accuracy", split="all of held_a.csv")
    rows = {r["run"]: r for r in lb.rows}
    assert rows["a"]["accuracy"] == 0.9 and rows["c"]["accuracy"] == 0.7
    assert rows["b"]["accuracy"] is None  # held_b.csv and its own training file are other splits
    own = {r["run"]: r for r in build_leaderboard(runs, metric="accuracy", split="all").rows}
    assert own["b"]["accuracy"] == 0.99 and own["a"]["accuracy"] is None
    assert lb.split == "all of held_a.csv"
    # the default split is the most common one, counted per data file
    assert build_leaderboard(runs, metric="accuracy").split == "all of held_a.csv"


def test_evaluations_of_the_training_file_keep_their_split(tmp_path):
    _run(tmp_path, "a", [("test", "/elsewhere/train.csv", 0.8)], data_path="../data/train.csv")
    _run(tmp_path, "s", [("test", "/pkg/chatforge/data/sample/chitchat.csv", 0.3)], data_path="sample")
    lb = build_leaderboard(collect_runs(runs_dir=tmp_path), metric="accuracy")
    assert lb.split == "test" and [r["accuracy"] for r in lb.rows] == [0.8, 0.3]


def test_default_split_is_one_that_reports_the_metric(tmp_path):
    # a generation run's evaluation (no accuracy), first in folder order, as ties used to be broken
    _run(tmp_path, "a-gen", [("all", "/x/a_qa.csv", None)])
    _run(tmp_path, "b-cls", [("test", "/d/train.csv", 0.6)])
    (tmp_path / "a-gen" / "eval" / "e0" / "evaluation.json").write_text(json.dumps({
        "split": "all", "data": "/x/a_qa.csv", "n": 3, "metrics": {"bleu": 1.0}}))
    lb = build_leaderboard(collect_runs(runs_dir=tmp_path), metric="accuracy")
    assert lb.split == "test" and lb.rows[0]["accuracy"] == 0.6
