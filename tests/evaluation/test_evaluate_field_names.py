"""`chatforge evaluate --data FILE --text-field/--label-field/--response-field` names the columns of a held-out
file whose headers the readers cannot infer. Before, such a file could not be evaluated at all: the reader's
error said "name one with text_field=", a config key the bundle's saved config fixes and evaluate had no flag for."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.data import DataError
from chatforge.evaluation.evaluate import evaluate_bundle
from chatforge.training.run import run_experiment


def _write(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fields")
    data = _write(tmp / "train.csv", ["text", "label"],
                  [(f"{w} sentence {i}", lab) for lab, w in (("a", "apple"), ("b", "banana")) for i in range(15)])
    tree = {"name": "fields", "seed": 0, "data": {"path": str(data), "valid_fraction": 0.2, "test_fraction": 0.2},
            "model": {"family": "linear", "task": "classification", "C": 10.0, "max_iter": 100},
            "output": {"dir": str(tmp)}, "tracking": {"enabled": False}}
    return run_experiment(validate_config(tree), run_dir=tmp / "run")


def test_named_columns_of_a_heldout_file(run, tmp_path):
    held = _write(tmp_path / "held.csv", ["sentence", "category", "note"],
                  [("apple sentence new", "a", "x"), ("banana sentence new", "b", "y"), ("apple again", "a", "")])
    with pytest.raises(DataError, match="cannot tell which field holds the text"):
        evaluate_bundle(run.bundle_dir, held, out_dir=tmp_path / "no", track=False)
    res = evaluate_bundle(run.bundle_dir, held, out_dir=tmp_path / "yes", track=False,
                          fields={"text_field": "sentence", "label_field": "category"})
    assert res.summary["n"] == 3
    r = CliRunner().invoke(app, ["evaluate", str(run.bundle_dir), "--data", str(held), "--text-field", "sentence",
                                 "--label-field", "category", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert "3 examples" in r.output
