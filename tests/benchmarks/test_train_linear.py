"""benchmarks/train_linear.py: a tiny run end to end writes its report, with both kernels timed and their losses
compared."""

from __future__ import annotations

import json

import pytest
from tests.benchmarks.conftest import load

from chatforge.modules import linear as linear_mod


@pytest.mark.slow
@pytest.mark.skipif(linear_mod._onednn_linear() is None, reason="this torch build has no oneDNN linear op")
def test_tiny_run_writes_its_report(tmp_path):
    script = load("train_linear")
    result = script.run(tmp_path, "tiny", threads=1)
    [layer] = result["layers"]
    assert layer["torch_ms"] > 0 and layer["onednn_ms"] > 0 and layer["ratio"] > 0
    assert [r["engine"] for r in result["steps"]] == list(script.ENGINES)
    assert all(r["tokens_per_s"] > 0 for r in result["steps"])
    agreement = result["config"]["step"]["agreement"]
    assert len(agreement["losses_onednn"]) == 5 and agreement["max_abs_loss_diff"] < 1e-3
    saved = json.loads((tmp_path / "train-linear.json").read_text())
    assert saved["machine"]["lscpu_model"] and saved["matmul_peak_gflops"]["onednn"] > 0
    assert "| chatforge-onednn |" in (tmp_path / "train-linear.md").read_text()
    assert (tmp_path / "train-linear.png").stat().st_size > 0
