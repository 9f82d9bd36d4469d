"""benchmarks/clinc150_contrastive.py on a tiny CLINC150-shaped file: both variants trained as asked, scored, put
in the ensemble with the SVM, reported; a run folder of another configuration is refused, not reused."""

from __future__ import annotations

import json

import pytest
import yaml
from tests.benchmarks.conftest import load
from tests.test_oos import intent_cfg

pytestmark = pytest.mark.slow


def _configs(tmp_path):
    common = {"data": {"dev_fraction": 0.25}}
    transformer = intent_cfg(tmp_path, family="transformer", name="tiny-transformer", d_model=16, n_heads=2,
                             num_encoder_layers=1, d_ff=32, dropout=0.0)
    transformer["tokenizer"] = {"vocab_size": 100, "on_vocab_too_large": "lower"}
    transformer["train"] = {"epochs": 2, "batch_size": 16, "lr": 5e-3, "num_threads": 1, "device": "cpu",
                            "warmup_ratio": 0.0}
    svm = intent_cfg(tmp_path, family="linear", name="tiny-svm", loss="svm", C=1.0, char_ngram_max=3)
    ensemble = intent_cfg(tmp_path, family="ensemble", name="tiny-ensemble", members=["placeholder"],
                          oos={"policy": "scorer", "max_in_scope_drop": 0.1})
    out = {}
    for name, tree in (("transformer", transformer), ("svm", svm), ("ensemble", ensemble)):
        tree["data"].update(common["data"])
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree), encoding="utf-8")
        out[name] = path
    return out


def test_both_variants_are_trained_scored_and_ensembled(tmp_path, monkeypatch):
    script = load("clinc150_contrastive")
    monkeypatch.setattr(script, "CONFIGS", _configs(tmp_path))
    out = tmp_path / "out"
    script.main(["--out", str(out), "--seeds", "0", "--weight", "0.7", "--temperature", "0.2"])
    result = json.loads((out / "results" / "clinc150-contrastive.json").read_text())
    assert set(result["transformers"]) == {"plain-s0", "contrastive-s0"}
    for r in result["transformers"].values():
        assert [(x["score"], x["setting"]) for x in r["bounded_threshold"]] == list(script.KEPT_SCORES)
        assert all(0 <= x["val_cross_fitted"][0] <= 100 and 0 <= x["dev"][1] <= 100 for x in r["bounded_threshold"])
    # the contrastive run trained with the asked weight and temperature, the plain one without the term
    cfg = yaml.safe_load((out / "transformer-contrastive-s0" / "config.yaml").read_text())
    assert (cfg["train"]["contrastive_weight"], cfg["train"]["contrastive_temperature"]) == (0.7, 0.2)
    hist = json.loads((out / "transformer-contrastive-s0" / "metrics.json").read_text())["history"]
    plain = json.loads((out / "transformer-plain-s0" / "metrics.json").read_text())["history"]
    assert "train_contrastive_loss" in hist[0] and "train_contrastive_loss" not in plain[0]
    # each ensemble averages the SVM with that variant's Transformers, the SVM weighing as much as all of them
    ens = yaml.safe_load((out / "ensemble-contrastive" / "config.yaml").read_text())["model"]
    assert ens["members"] == [str(out / "svm"), str(out / "transformer-contrastive-s0")]
    assert ens["weights"] == [1.0, 1.0]
    for variant in ("plain", "contrastive"):
        e = result["ensembles"][variant]
        assert e["val_cross_fitted"]["folds"] == 10 and 0 <= e["dev"]["in_scope_accuracy"] <= 1
    assert "| contrastive-s0 |" in (out / "results" / "clinc150-contrastive.md").read_text()
    # a second call with another weight must not pass the existing run off as that configuration
    with pytest.raises(SystemExit, match="train differ"):
        script.main(["--out", str(out), "--seeds", "0", "--weight", "0.3", "--temperature", "0.2"])
