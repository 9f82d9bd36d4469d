"""benchmarks/clinc_xgboost.py: a tiny run on a CLINC150-shaped file finishes and writes its result with the CPU.

It crashed after training (the whole 36-minute run) reading ``model._vectorizers``, which the classifier no longer
has; and README quotes its training time, so the result names the CPU and load it was measured under.
"""

from __future__ import annotations

import json
import sys

from tests.benchmarks.conftest import load

INTENTS = {"greet": ["hello there", "hi friend", "good morning", "hey you"],
           "bye": ["see you later", "goodbye now", "bye bye", "farewell friend"]}


def test_a_tiny_run_writes_features_and_the_machine(tmp_path, monkeypatch, capsys):
    data = {"train": [[t, y] for y, ts in INTENTS.items() for t in ts],
            "val": [[t, y] for y, ts in INTENTS.items() for t in ts[:2]],
            "oos_train": [["what is the weather", "oos"], ["order a pizza", "oos"]],
            "oos_val": [["play a song", "oos"]]}
    path = tmp_path / "clinc.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["clinc_xgboost.py", "--data", str(path), "--n-estimators", "2",
                                      "--max-features", "20", "--n-jobs", "1", "--oos-threshold", "none",
                                      "--out", str(out)])
    load("clinc_xgboost").main()
    result = json.loads(out.read_text())
    assert result["n_features"] > 0 and result["n_val"] == 5
    from chatforge.runtime import cpu_info

    here = cpu_info()
    for key in ("cpu_before", "cpu_after"):
        assert result["machine"][key]["model_name"] == here["model_name"]
        assert result["machine"][key]["flags"] == here["flags"] and len(result["machine"][key]["load_average"]) == 3
    assert here["model_name"] in capsys.readouterr().out
