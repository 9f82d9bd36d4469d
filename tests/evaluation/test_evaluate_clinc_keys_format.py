"""`chatforge evaluate --clinc-keys` on a file that is not CLINC150 JSON is refused. Before, the keys were
ignored: `--clinc-keys val` on a CSV scored every row of it, training rows included, and labelled them "val"."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.evaluation.evaluate import EvaluationError, evaluate_bundle
from chatforge.training.run import run_experiment


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("csvrun")
    data = tmp / "train.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([(f"{word} number {i}", label) for label, word in (("a", "apple"), ("b", "banana"))
                     for i in range(15)])
    tree = {"name": "csvrun", "seed": 0, "data": {"path": str(data), "valid_fraction": 0.2, "test_fraction": 0.2},
            "model": {"family": "linear", "task": "classification", "C": 10.0, "max_iter": 100},
            "output": {"dir": str(tmp)}, "tracking": {"enabled": False}}
    return run_experiment(validate_config(tree), run_dir=tmp / "run"), data


def test_clinc_keys_on_a_csv_are_refused(csv_run, tmp_path):
    run, data = csv_run
    with pytest.raises(EvaluationError, match=r"--clinc-keys.*CLINC150.*csv"):
        evaluate_bundle(run.bundle_dir, clinc_keys=["val"], out_dir=tmp_path / "a", track=False)
    with pytest.raises(EvaluationError, match=r"--clinc-keys"):
        evaluate_bundle(run.bundle_dir, data, clinc_keys=["test"], out_dir=tmp_path / "b", track=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    r = CliRunner().invoke(app, ["evaluate", str(run.bundle_dir), "--clinc-keys", "val", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--clinc-keys" in r.output
