"""benchmarks/attention_kernels.py: a tiny run end to end writes its report, with both kernels timed, every training
engine measured and the two attention paths' losses compared."""

from __future__ import annotations

import json
import os

import pytest
from tests.benchmarks.conftest import load

from chatforge.modules.attention import ATTENTION_ENV


@pytest.mark.slow
def test_tiny_run_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setenv(ATTENTION_ENV, "auto")
    script = load("attention_kernels")
    result = script.run(tmp_path, "tiny", threads=1)
    assert os.environ[ATTENTION_ENV] == "auto"  # the step engines put the variable back
    kinds = {(k["precision"], k["mask"], k["length"]) for k in result["kernels"]}
    assert {("fp32", "causal", 8), ("fp32", "padding", 16)} <= kinds
    assert all(k["sdpa_ms"] > 0 and k["materialized_ms"] > 0 and k["auto_uses"] == "materialized"
               for k in result["kernels"])
    assert {r["engine"] for r in result["steps"] if r["precision"] == "fp32"} == set(script.STEP_ENGINES)
    assert all(r["tokens_per_s"] > 0 for r in result["steps"])
    agreement = result["config"]["step"]["agreement"]
    assert len(agreement["losses_materialized"]) == 5 and agreement["max_abs_loss_diff"] < 1e-4
    saved = json.loads((tmp_path / "attention-kernels.json").read_text())
    assert saved["machine"]["lscpu_model"]
    assert "| fp32 | chatforge-auto |" in (tmp_path / "attention-kernels.md").read_text()
    assert (tmp_path / "attention-kernels.png").stat().st_size > 0


def test_the_environment_is_restored_after_a_step_engine(monkeypatch):
    script = load("attention_kernels")
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    with script.attention_env("sdpa"):
        assert os.environ[ATTENTION_ENV] == "sdpa"
    assert ATTENTION_ENV not in os.environ
