"""benchmarks/chatbot_decoding.py: the setting is chosen on valid only, and test reports just it and greedy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from chatforge.config import validate_config
from chatforge.training.run import run_experiment

ROOT = Path(__file__).resolve().parents[2]


def test_decoding_is_chosen_on_valid_and_reported_on_test(tmp_path):
    cfg = validate_config({
        "name": "dec", "seed": 0, "tracking": {"enabled": False},
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.1},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "transformer", "task": "generation", "d_model": 16, "n_heads": 2,
                  "num_encoder_layers": 1, "num_decoder_layers": 1, "d_ff": 32},
        "train": {"epochs": 1, "max_steps": 4, "batch_size": 16, "max_source_len": 16, "max_target_len": 8},
    })
    bundle = run_experiment(cfg, run_dir=tmp_path / "run").bundle_dir
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chatbot_decoding.py"), str(bundle), "--out",
                        str(out), "--max-examples", "6"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "decoding.json").read_text(encoding="utf-8"))
    valid = res["valid"]
    assert len(valid) == 7 and all(v["n"] == 6 for v in valid.values())
    best = max(valid, key=lambda k: (valid[k]["chrf"], valid[k]["distinct_2"]))
    assert res["chosen_on_valid"] == best
    assert set(res["test"]) == {"greedy", best}  # nothing else is scored on test
    assert res["machine"]["cpu"] and "(chosen)" in (out / "decoding.md").read_text(encoding="utf-8")
