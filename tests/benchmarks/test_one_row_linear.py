"""benchmarks/one_row_linear.py: a tiny run writes its JSON and Markdown report, with every kernel timed per layer
shape and state, the policy's choice per shape, and the decode-step A/B with its token agreement."""

from __future__ import annotations

import json

import pytest
from tests.benchmarks.conftest import load

from chatforge.modules import linear as linear_mod

script = load("one_row_linear")


@pytest.mark.skipif(linear_mod._onednn_linear() is None, reason="this torch build has no oneDNN linear op")
def test_tiny_run_writes_its_report(tmp_path):
    out = tmp_path / "one-row.json"
    script.main(["--size", "tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    shapes = {(r["outputs"], r["inputs"], r["state"]) for r in result["layers"]}
    assert shapes == {(512, 128, "warm"), (512, 128, "cold"), (128, 512, "warm"), (128, 512, "cold")}
    assert all(set(r["us"]) == {"F.linear", "oneDNN", "transposed"} and min(r["us"].values()) > 0
               for r in result["layers"])
    assert [r["chosen_by_policy"] for r in result["layers"]] == [True, True, False, False]
    decode = result["decode"]
    assert decode["ms_per_step"]["with"] > 0 and decode["ms_per_step"]["without"] > 0
    assert decode["same_greedy_tokens"] is True
    assert "GPT decode step" in out.with_suffix(".md").read_text()
