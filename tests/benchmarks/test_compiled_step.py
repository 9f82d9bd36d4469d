"""benchmarks/compiled_step.py at tiny sizes: the JSON it writes, and the static-shape step's parity with
the shipped decoding path (the greedy replies must be the same tokens)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.benchmarks.conftest import load

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64", "--prompt-len", "5",
        "--new-tokens", "4", "--repeats", "2", "--batches", "1", "3"]


@pytest.fixture(scope="module")
def script():
    return load("compiled_step")


@pytest.fixture(autouse=True)
def _restore_process_settings(monkeypatch):
    """main() sets torch's thread count and OMP_WAIT_POLICY for its run; put both back for other tests."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    yield
    torch.set_num_threads(threads)


def test_writes_per_batch_figures_and_agreement(script, tmp_path):
    # Eager variants only: compiling takes tens of seconds on a 2-core machine (the slow test compiles).
    out = tmp_path / "cs.json"
    script.main([*TINY, "--variants", "eager", "static_eager", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "compiled_step"
    assert data["machine_before"]["model_name"] and len(data["machine_before"]["load_average"]) == 3
    assert data["torch_threads"] == 2
    assert set(data["results"]) == {"batch1", "batch3"}
    for batch, res in ((1, data["results"]["batch1"]), (3, data["results"]["batch3"])):
        assert set(res) == {"eager", "static_eager"}
        for r in res.values():
            assert len(r["decode_s"]) == 2 and all(t > 0 for t in r["decode_s"])
            assert r["tokens_per_s_median"] > 0 and r["ms_per_step_median"] > 0
        # The static-shape step is the same arithmetic over fixed-capacity buffers: same greedy tokens.
        assert res["static_eager"]["agreement_with_eager"] == {"position": 1.0, "identical": True,
                                                               "tokens_compared": batch * 4}
        assert res["static_eager"]["max_abs_logit_diff_vs_eager"] < 1e-5
        assert "agreement_with_eager" not in res["eager"]


def test_token_agreement_counts_differing_positions(script):
    got = script.token_agreement([[1, 2, 3], [4, 5, 6]], [[1, 9, 3], [4, 5, 6]])
    assert got == {"position": pytest.approx(5 / 6), "identical": False, "tokens_compared": 6}


def test_variants_must_include_the_eager_reference(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main([*TINY, "--variants", "static_eager", "--out", str(tmp_path / "x.json")])


@pytest.mark.slow
def test_compiled_static_step_matches_eager(script, tmp_path):
    # Compiles (inductor, gcc): the compiled static-shape step gives eager's greedy tokens.
    out = tmp_path / "cs.json"
    script.main([*TINY, "--repeats", "1", "--batches", "2", "--variants", "eager", "compiled_static",
                 "--out", str(out)])
    res = json.loads(out.read_text())["results"]["batch2"]["compiled_static"]
    assert res["agreement_with_eager"] == {"position": 1.0, "identical": True, "tokens_compared": 8}
    assert res["max_abs_logit_diff_vs_eager"] < 1e-4  # inductor may reorder float sums
    assert res["compile_s"] > 0 and res["dynamo"]["warmup"]["unique_graphs"] >= 1
    assert res["dynamo"]["timed"]["unique_graphs"] == 0  # no recompile once warm: the shapes are static
