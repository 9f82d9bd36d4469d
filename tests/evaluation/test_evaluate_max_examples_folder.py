"""`chatforge evaluate --max-examples N` names its cut (split ``test-firstN``): before, a quick look at 5 examples
wrote over the full evaluation of the same split (same folder, same split name), and `chatforge compare` then
ranked the run by those 5 examples as its test figures."""

from __future__ import annotations

import json

import pytest

from chatforge.config import validate_config
from chatforge.evaluation.compare import build_leaderboard, collect_runs
from chatforge.evaluation.evaluate import evaluate_bundle
from chatforge.training.run import run_experiment


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cut")
    tree = {"name": "cut", "seed": 0, "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.1},
            "model": {"family": "linear", "task": "classification", "C": 10.0, "max_iter": 100},
            "output": {"dir": str(tmp)}, "tracking": {"enabled": False}}
    return run_experiment(validate_config(tree), run_dir=tmp / "runs" / "cut")


def test_a_cut_evaluation_keeps_the_full_one(sample_run):
    full = evaluate_bundle(sample_run.bundle_dir, split="test", track=False)
    cut = evaluate_bundle(sample_run.bundle_dir, split="test", max_examples=5, track=False)
    assert cut.out_dir != full.out_dir and cut.summary["split"] == "test-first5" and cut.summary["n"] == 5
    kept = json.loads((full.out_dir / "evaluation.json").read_text())
    assert kept["n"] == full.summary["n"] > 5 and kept["split"] == "test"
    lb = build_leaderboard(collect_runs(runs_dir=sample_run.run_dir.parent), metric="accuracy", split="test")
    assert lb.rows[0]["n"] == full.summary["n"]
    # a cap the split does not reach cuts nothing and keeps the split's name
    whole = evaluate_bundle(sample_run.bundle_dir, split="test", max_examples=10_000, track=False)
    assert whole.summary["split"] == "test" and whole.out_dir == full.out_dir
