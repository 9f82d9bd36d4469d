"""benchmarks/served_classification.py: its arithmetic (medians, ratios, agreement) and, marked slow, a tiny
run end to end (four real servers and the direct ONNX Runtime anchors) that writes its report."""

from __future__ import annotations

import json

import pytest
from tests.benchmarks.conftest import load


@pytest.fixture(scope="module")
def script():
    return load("served_classification")


def _rep(tps: float, latency: float) -> dict:
    return {"texts_per_s": tps, "latency_ms": latency}


def test_medians_and_ratios(script):
    runs = {"chatforge-ort-int8": {"1 caller": [_rep(100, 10), _rep(300, 3), _rep(200, 5)],
                                   "32 callers": [_rep(800, 40)]},
            "ort-direct-int8": {"1 caller": [_rep(400, 2)], "32 callers": [_rep(1000, 20)]}}
    rows = script.summarize(runs)
    by = {(r["engine"], r["case"]): r for r in rows}
    assert by[("chatforge-ort-int8", "1 caller")]["texts_per_s"] == 200  # the median, not the mean or last
    assert by[("chatforge-ort-int8", "1 caller")]["latency_ms"] == 5
    assert by[("chatforge-ort-int8", "1 caller")]["reps_texts_per_s"] == [100, 300, 200]
    got = {(r["case"], r["chatforge"], r["anchor"]): r for r in script.ratios(rows)}
    assert set(got) == {("1 caller", "chatforge-ort-int8", "ort-direct-int8"),
                        ("32 callers", "chatforge-ort-int8", "ort-direct-int8")}
    one = got[("1 caller", "chatforge-ort-int8", "ort-direct-int8")]
    assert one["texts_per_s"] == 0.5 and one["best_texts_per_s"] == 0.75  # 200/400; 300/400
    assert got[("32 callers", "chatforge-ort-int8", "ort-direct-int8")]["texts_per_s"] == 0.8


def test_agreement_against_the_reference(script):
    argmax = {"chatforge-torch-fp32": ["a", "b", "c", "d"], "x": ["a", "b", "z", "d"], "y": ["a", "b", "c", "d"]}
    assert script.agreement(argmax) == {"x": 0.75, "y": 1.0}


@pytest.mark.slow
def test_tiny_run_writes_the_report(script, tmp_path):
    pytest.importorskip("onnxruntime")
    result = script.run(tmp_path, script.SIZES["tiny"], reps=1)
    assert {r["engine"] for r in result["rows"]} == {*script.SERVED, *script.ANCHORS, *script.IN_PROCESS}
    assert all(r["texts_per_s"] > 0 and r["latency_ms"] > 0 for r in result["rows"])
    assert len(result["ratios"]) == (len(script.SERVED) + len(script.IN_PROCESS)) * len(script.ANCHORS) * len(script.CASES)
    # Same weights: the fp32 paths give chatforge torch fp32's labels.
    for fp32 in ("chatforge-ort-fp32", "ort-direct-fp32", "ort-backend-inprocess-fp32"):
        assert result["agreement"][fp32] == 1.0
    saved = json.loads((tmp_path / "served-classification.json").read_text())
    assert saved["machine"]["lscpu_model"] and saved["machine"]["load_before"]
    assert "| chatforge-ort-int8 | 32 callers |" in (tmp_path / "served-classification.md").read_text()
