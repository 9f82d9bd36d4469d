"""`chatforge compare`: a run without an evaluation of the leaderboard's split falls back to its metrics.json
figures of that same split, never to another split's. Before, a leaderboard "on split test" showed the
validation figures of every run not evaluated on test, ranked against the others' test figures."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from chatforge.evaluation.compare import build_leaderboard, collect_runs


def _run(root: Path, name: str, metrics: dict, evaluation: dict | None = None, data: dict | None = None) -> None:
    run = root / name
    run.mkdir(parents=True)
    cfg = {"name": name, "model": {"family": "transformer", "task": "classification"},
           "data": data or {"split": "random", "valid_keys": ["val", "oos_val"]}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text(json.dumps(metrics))
    if evaluation is not None:
        (run / "eval" / f"data-{evaluation['split']}").mkdir(parents=True)
        (run / "eval" / f"data-{evaluation['split']}" / "evaluation.json").write_text(json.dumps(evaluation))


def test_fallback_reads_the_leaderboards_split(tmp_path):
    _run(tmp_path, "a-evaluated", {"valid_accuracy": 0.99, "valid_examples": 60},
         {"split": "test", "n": 60, "created": "2026-01-01T00:00:00+00:00", "metrics": {"accuracy": 0.70}})
    _run(tmp_path, "b-test-in-metrics", {"valid_accuracy": 0.95, "valid_examples": 60,
                                         "test_accuracy": 0.60, "test_examples": 55})
    _run(tmp_path, "c-no-test", {"valid_accuracy": 0.97, "valid_examples": 40, "test_examples": 0})
    lb = build_leaderboard(collect_runs(runs_dir=tmp_path), metric="accuracy")
    assert lb.split == "test"
    rows = {r["run"]: r for r in lb.rows}
    assert rows["a-evaluated"]["accuracy"] == 0.70
    assert rows["b-test-in-metrics"]["accuracy"] == 0.60 and rows["b-test-in-metrics"]["n"] == 55
    assert rows["c-no-test"]["accuracy"] is None and not rows["c-no-test"]["n"]  # no test figures at all
    assert [r["run"] for r in lb.rows] == ["a-evaluated", "b-test-in-metrics", "c-no-test"]


def test_predefined_valid_lists_still_fall_back_to_valid(tmp_path):
    data = {"split": "predefined", "valid_keys": ["val", "oos_val"]}
    _run(tmp_path, "a", {"valid_accuracy": 0.9}, {"split": "val+oos_val", "n": 3, "metrics": {"accuracy": 0.8}},
         data=data)
    _run(tmp_path, "b", {"valid_accuracy": 0.85, "valid_examples": 3100}, data=data)
    _run(tmp_path, "c-other-lists", {"valid_accuracy": 0.5},
         data={"split": "predefined", "valid_keys": ["val"]})
    rows = {r["run"]: r for r in build_leaderboard(collect_runs(runs_dir=tmp_path), metric="accuracy").rows}
    assert rows["b"]["accuracy"] == 0.85 and rows["b"]["n"] == 3100
    assert rows["c-other-lists"]["accuracy"] is None
