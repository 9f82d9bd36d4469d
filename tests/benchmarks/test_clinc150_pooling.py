"""benchmarks/clinc150_pooling.py: both poolings scored per subset against a hand count, and the script end to end
on tiny runs that hold out a dev split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.benchmarks.conftest import load
from tests.test_oos import intent_cfg

from chatforge.config import validate_config
from chatforge.training.run import run_experiment

LABELS = ["a", "b", "oos"]


def test_compare_counts_each_pooling_per_subset():
    script = load("clinc150_pooling")
    truth = {"val": ["b", "a", "oos"], "dev": ["b", "a", "oos"]}
    # the linear member is sure of "a" on the first query, which is "b"; Transformer 0 all but rules "a" out there
    linear = {p: np.array([[0.90, 0.09, 0.01], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]) for p in truth}
    vetoes = {p: np.array([[0.001, 0.699, 0.30], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6]]) for p in truth}
    mild = {p: np.array([[0.40, 0.35, 0.25], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6]]) for p in truth}
    rows = script.compare(linear, [vetoes, mild], LABELS, truth, [1, 2])
    one, two = rows
    assert one["subsets"] == 2 and two["subsets"] == 1
    # k = 1: with `vetoes` geometric gets the first query right (2 of 2 in scope), average does not (1 of 2);
    # with `mild` both get it wrong
    assert one["val"]["average"] == 50.0 and one["val"]["geometric"] == 75.0
    assert one["val"]["geometric_ahead"] == 0.5 and one["val"]["level"] == 0.5
    assert one["dev"] == one["val"]
    # k = 2: the two Transformers share half the weight: geometric still vetoes "a"
    # (a: 0.9^.5 * .001^.25 * .4^.25, b: .09^.5 * .699^.25 * .35^.25)
    assert two["val"]["average"] == 50.0 and two["val"]["geometric"] == 100.0


@pytest.mark.slow
def test_script_end_to_end_on_tiny_runs(tmp_path):
    script = load("clinc150_pooling")
    runs = []
    for name, extra in (("svm", {"loss": "svm"}), ("lr", {"C": 1.0, "char_ngram_max": 3})):
        tree = intent_cfg(tmp_path, family="linear", name=name, **extra)
        tree["data"]["dev_fraction"] = 0.25
        runs.append(run_experiment(validate_config(tree), run_dir=tmp_path / name).run_dir)
    out = tmp_path / "res" / "pooling"
    script.main(["--linear", str(runs[0]), "--transformers", str(runs[1]), str(runs[1]), "--out", str(out)])
    got = json.loads(out.with_suffix(".json").read_text())
    assert [r["k"] for r in got["rows"]] == [1, 2] and got["rows"][0]["subsets"] == 2
    for r in got["rows"]:
        for part in ("val", "dev"):
            assert 0.0 <= r[part]["average"] <= 100.0 and 0.0 <= r[part]["geometric"] <= 100.0
            assert abs(r[part]["geometric_ahead"] + r[part]["level"] + r[part]["geometric_behind"] - 1.0) < 1e-6
    assert "| 1 | 2 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        script.main(["--linear", str(runs[0]), "--transformers", str(runs[1]), "--sizes", "2", "--out", str(out)])
