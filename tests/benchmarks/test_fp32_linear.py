"""benchmarks/fp32_linear.py: its agreement arithmetic and, marked slow, a tiny run end to end that writes its report."""

from __future__ import annotations

import json

import pytest
from tests.benchmarks.conftest import load


@pytest.fixture(scope="module")
def script():
    return load("fp32_linear")


def test_agreement_of_token_ids_and_of_scores(script):
    assert script._agree([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]]) == {"identical_outputs": 0.5}
    got = script._agree([{"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.0}], [{"a": 0.25, "b": 0.75}, {"a": 1.0, "b": 0.0}])
    assert got == {"max_abs_diff": 0.25}


@pytest.mark.slow
def test_tiny_run_writes_its_report(script, tmp_path):
    result = script.run(tmp_path, "tiny", reps=1)
    cases = [r["case"] for r in result["rows"]]
    assert cases == ["gpt generation, batch 1", "gpt generation, batch 2", "transformer generation, batch 1",
                     "transformer generation, batch 2", "bert classification, batch 1", "bert classification, batch 4"]
    assert all(r["aten_per_s"] > 0 and r["onednn_per_s"] > 0 for r in result["rows"])
    assert result["config"]["packed_linear_layers_gpt"]["aten"] == 0
    saved = json.loads((tmp_path / "fp32-linear.json").read_text())
    assert saved["machine"]["lscpu_model"] and len(saved["rows"]) == 6
    assert "| gpt generation, batch 1 | tokens/s |" in (tmp_path / "fp32-linear.md").read_text()
