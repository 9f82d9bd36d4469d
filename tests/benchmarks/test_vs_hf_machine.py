"""benchmarks/bert_vs_hf.py and gpt_vs_hf.py record the machine they ran on, as the other benchmark scripts do.

Their README figures are read as "quiet machine, 2 threads"; the JSON has to say which CPU (model, flags), how many
CPUs and threads, and the load before and after, or a rerun elsewhere cannot be told from the committed one
(bert_vs_hf.json's "cpu" was platform.machine(): "x86_64").
"""

from __future__ import annotations

import json
import sys

import pytest

from .conftest import load

TINY = {
    "bert_vs_hf": ["--tasks", "classification", "--precisions", "fp32", "--d-model", "16", "--layers", "1",
                   "--heads", "2", "--vocab", "64", "--batch", "2", "--seq", "8", "--steps", "1", "--rounds", "1",
                   "--threads", "1"],
    "gpt_vs_hf": ["--layers", "1", "--d-model", "16", "--heads", "2", "--vocab", "64", "--positions", "32",
                  "--batch", "2", "--seq-len", "8", "--train-steps", "1", "--prompt-len", "4", "--new-tokens", "2",
                  "--reps", "1", "--threads", "1", "--precisions", "fp32"],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_result_names_the_cpu_threads_and_load(name, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.json" if name == "bert_vs_hf" else tmp_path
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *TINY[name], "--out", str(out)])
    load(name).main()
    path = out if name == "bert_vs_hf" else next(tmp_path.glob("gpt_vs_hf-*.json"))
    result = json.loads(path.read_text())
    from chatforge.runtime import cpu_info

    here = cpu_info()
    for key in ("machine_before", "machine_after"):
        m = result[key]
        assert m["model_name"] == here["model_name"] and m["flags"] == here["flags"]
        assert m["available_cpus"] == here["available_cpus"] and m["torch_threads"] == 1
        assert len(m["load_average"]) == 3
    assert here["model_name"] in capsys.readouterr().out  # the printed summary says it too
