"""benchmarks/ranker_select.py on a tiny ranker bundle: the served path and the earlier computation give the same
features, and the report says so."""

from __future__ import annotations

import json

import pytest
from tests.benchmarks.conftest import ROOT, load

from chatforge.config import validate_config
from chatforge.training.run import run_experiment


@pytest.mark.slow
def test_the_served_features_equal_the_earlier_ones_and_the_report_is_written(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    cfg = validate_config({
        "name": "ranker", "seed": 0,
        "data": {"path": "sample", "format": "chatbot_csv", "valid_fraction": 0.1, "test_fraction": 0.1},
        "model": {"family": "retrieval", "task": "selection", "encoder": "ranker", "ranker_trees": 10,
                  "ranker_folds": 2, "ranker_negatives": 3, "ranker_neighbours": [3], "ranker_shortlist": 5},
        "tracking": {"enabled": False},
    })
    bundle = run_experiment(cfg, run_dir=tmp_path / "run").bundle_dir
    out = tmp_path / "rs.json"
    r = load("ranker_select").main(["--bundle", str(bundle), "--messages", "6", "--rounds", "1", "--out", str(out)])
    assert r["max_abs_feature_difference"] == 0.0 and r["same_top_answer"] == 1.0
    assert r["messages"] == 6 and r["features_ms"]["now"] > 0 and r["features_ms"]["earlier"] > 0
    assert json.loads(out.read_text())["speedup"] == r["speedup"]
    assert r["machine"]["lscpu_model"] in out.with_suffix(".md").read_text(encoding="utf-8")
    with pytest.raises(SystemExit, match="not a learned-ranker"):
        tfidf = validate_config({**cfg.model_dump(), "name": "tfidf",
                                 "model": {"family": "retrieval", "task": "selection", "encoder": "tfidf"}})
        load("ranker_select").main(["--bundle", str(run_experiment(tfidf, run_dir=tmp_path / "t").bundle_dir),
                                    "--out", str(tmp_path / "x.json")])
