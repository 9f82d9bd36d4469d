"""`chatforge compare` skips an evaluation.json that is not an evaluation summary (a JSON list, no split, no
metrics object: edited by hand, or written by something else), with a warning naming it, as it already does for
an unreadable one. Before, `[]` ended the whole leaderboard in "AttributeError: 'list' object has no attribute
'get'", and ``"metrics": null`` in another AttributeError once that split was ranked."""

from __future__ import annotations

import json
import logging

import pytest
from tests.evaluation.test_compare import make_run

from chatforge.evaluation.compare import build_leaderboard, collect_runs


@pytest.mark.parametrize("bad", [[], {"n": 3}, {"split": "val+oos_val", "metrics": None}, "text"])
def test_a_foreign_evaluation_json_is_skipped(tmp_path, caplog, bad):
    make_run(tmp_path, "a-linear", "linear", 0.92, 0.40, 0.1)
    make_run(tmp_path, "b-transformer", "transformer", 0.95, 0.30, 0.001)
    other = tmp_path / "b-transformer" / "eval" / "zz-other"
    other.mkdir(parents=True)
    (other / "evaluation.json").write_text(json.dumps(bad))
    with caplog.at_level(logging.WARNING, logger="chatforge.evaluation.compare"):
        lb = build_leaderboard(collect_runs(runs_dir=tmp_path), metric="in_scope_accuracy")
    assert [r["run"] for r in lb.rows] == ["b-transformer", "a-linear"] and lb.rows[0]["in_scope_accuracy"] == 0.95
    assert any("zz-other" in r.getMessage() for r in caplog.records)
