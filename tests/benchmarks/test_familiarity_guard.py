"""benchmarks/familiarity_guard.py on a tiny selector: the guard is chosen on valid and scored on what it never saw,
and the report (JSON, Markdown, PNG) says so."""

from __future__ import annotations

import json

import pytest
from tests.benchmarks.conftest import ROOT, load

from chatforge.config import validate_config
from chatforge.training.run import run_experiment


@pytest.mark.slow
def test_the_guard_is_chosen_on_valid_and_scored_on_held_out_and_foreign_messages(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    cfg = validate_config({
        "name": "sel", "seed": 0,
        "data": {"path": "sample", "format": "chatbot_csv", "valid_fraction": 0.2, "test_fraction": 0.2},
        "model": {"family": "retrieval", "task": "selection", "encoder": "tfidf", "neighbours": 5},
        "tracking": {"enabled": False},
    })
    bundle = run_experiment(cfg, run_dir=tmp_path / "run").bundle_dir
    policy = tmp_path / "policy.yaml"
    policy.write_text("retriever: sel\nretrieval_threshold: 0.3\nfallback_reply: '?'\n", encoding="utf-8")
    clinc = tmp_path / "clinc.json"  # the English set's file format (CLINC150 data_full), a few utterances
    clinc.write_text(json.dumps({"val": [["how do i reset my password", "x"], ["book a flight to paris", "y"]],
                                 "oos_val": [["what is the capital of peru", "oos"]]}), encoding="utf-8")
    out = tmp_path / "guard.json"
    r = load("familiarity_guard").main(["--bundle", str(bundle), "--policy", str(policy), "--clinc", str(clinc),
                                        "--quantile", "0.05", "--n-synthetic", "40", "--timed", "5", "--rounds", "1",
                                        "--out", str(out)])
    fam = r["familiarity"]
    # chosen on valid: an observed validation value with about 5 % of valid below it
    assert r["min_familiarity"] in fam["valid"] and r["chosen_on"] == "valid"
    assert r["sets"]["valid"]["fallback_share"] <= 0.05
    assert set(r["sets"]) == {"valid", "test", "english_clinc150", "keyboard_mash", "random_hangul", "word_salad"}
    assert r["sets"]["english_clinc150"]["n"] == 3
    # the sample corpus is Korean and English, so only Hangul syllables it never saw are foreign to it
    assert r["sets"]["random_hangul"]["fallback_share"] > 0.9 > r["sets"]["test"]["fallback_share"]
    for row in r["sets"].values():
        assert row["answered_from_pool_with_guard"] <= row["answered_from_pool_without_guard"]
        assert row["answered_from_pool_with_guard"] <= 1 - row["fallback_share"] + 1e-12
    assert r["speed"]["guard_us"] > 0 and r["speed"]["select_us"] > 0
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["min_familiarity"] == r["min_familiarity"]
    md = out.with_suffix(".md").read_text(encoding="utf-8")
    assert f"{r['min_familiarity']:.3f}" in md and r["machine"]["lscpu_model"] in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
