"""benchmarks/gpt_batching.py: its ratios and, marked slow, a tiny run end to end that writes its report."""

from __future__ import annotations

import json

import pytest
from tests.benchmarks.conftest import load


@pytest.fixture(scope="module")
def script():
    return load("gpt_batching")


def _row(engine: str, case: str, tps: float, best: float, ttft: float) -> dict:
    return {"engine": engine, "case": case, "tokens_per_s": tps, "best_tokens_per_s": best, "ttft_ms": ttft}


def test_ratios_are_continuous_over_per_request_per_precision_and_case(script):
    rows = [_row("continuous-fp32", "concurrent", 800, 900, 10), _row("per-request-fp32", "concurrent", 200, 300, 40),
            _row("continuous-int8", "1 stream", 300, 300, 5), _row("per-request-int8", "1 stream", 400, 600, 4)]
    got = {(r["case"], r["precision"]): r for r in script.ratios(rows)}
    assert set(got) == {("concurrent", "fp32"), ("1 stream", "int8")}  # pairs with a missing side are left out
    assert got[("concurrent", "fp32")] == {"case": "concurrent", "precision": "fp32", "tokens_per_s": 4.0,
                                           "best_tokens_per_s": 3.0, "ttft": 4.0}
    assert got[("1 stream", "int8")]["tokens_per_s"] == 0.75 and got[("1 stream", "int8")]["ttft"] == 0.8


@pytest.mark.slow
def test_tiny_run_writes_its_report(script, tmp_path):
    import served_generation as sg  # gpt_batching put benchmarks/ on sys.path

    result = script.run(tmp_path, sg.SIZES["tiny"], reps=1)
    assert result["runners"] == {"continuous-fp32": "continuous", "per-request-fp32": "threaded",
                                 "continuous-int8": "continuous", "per-request-int8": "threaded"}
    assert {(r["engine"], r["case"]) for r in result["rows"]} == {(e, c) for e in script.ENGINES for c in script.CASES}
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert set(result["agreement"]) == set(script.ENGINES) - {script.REFERENCE}
    saved = json.loads((tmp_path / "gpt-batching.json").read_text())
    assert saved["machine"]["lscpu_model"] and len(saved["ratios"]) == 4
    assert "| concurrent | fp32 |" in (tmp_path / "gpt-batching.md").read_text()
