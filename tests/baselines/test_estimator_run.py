"""Estimator families (xgboost, linear) through the run driver, bundles and the served Classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.test_oos import intent_cfg

from chatforge.bundle import BundleError, load_bundle
from chatforge.config import ConfigError, load_config, validate_config
from chatforge.inference import Classifier, load_model
from chatforge.registry import families, get_family
from chatforge.training.run import run_experiment

REPO = Path(__file__).resolve().parents[2]
TINY = {"xgboost": {"n_estimators": 8, "max_depth": 3, "max_features": 300},
        "linear": {"C": 10.0, "max_iter": 200, "char_ngram_max": 3}}


def sample_cfg(tmp_path: Path, family: str) -> dict:
    return {"name": f"tiny-{family}", "seed": 0,
            "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.1, "stratify": True},
            "model": {"family": family, "task": "classification", **TINY[family]},
            "output": {"dir": str(tmp_path / "runs")}, "tracking": {"enabled": False}}


def test_estimator_families_registered():
    assert {"xgboost", "linear", "ensemble"} <= set(families())
    assert all(get_family(f).kind == "estimator" for f in ("xgboost", "linear", "ensemble"))


@pytest.mark.parametrize("family", ["xgboost", "linear"])
def test_sample_corpus_train_bundle_serve(tmp_path, family):
    res = run_experiment(validate_config(sample_cfg(tmp_path, family)), run_dir=tmp_path / "run")
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    assert metrics["kind"] == "estimator" and metrics["train_examples"] > 0 and metrics["history"] == []
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    names = {p.name for p in res.bundle_dir.iterdir()}
    assert {"config.yaml", "labels.json", "metadata.json"} <= names
    assert "weights.safetensors" not in names and "tokenizer.model" not in names
    assert not any(n.startswith(".") for n in names)  # atomic: no temp leftovers
    for p in res.bundle_dir.iterdir():  # JSON or safetensors only: nothing pickled
        head = p.read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x04", b"PK"), p.name
    meta = json.loads((res.bundle_dir / "metadata.json").read_text())
    assert meta["kind"] == "estimator" and meta["family"] == family and meta["oos"]["policy"] == "train"

    b = load_bundle(res.bundle_dir)
    clf = load_model(res.bundle_dir, "intents")
    assert isinstance(clf, Classifier) and clf.labels == b.labels
    texts = ["안녕하세요", "what's the weather like?", "I feel sad today"]
    preds = clf.classify(texts)
    probs = b.model.predict_proba(texts)
    for p, row in zip(preds, probs, strict=True):
        assert p.label == b.labels[int(row.argmax())] and p.score == pytest.approx(float(row.max()))
        assert sum(p.scores.values()) == pytest.approx(1.0, abs=1e-4)
    assert clf.count_tokens("three word text") == 3


def test_estimator_rejects_generation_task(tmp_path):
    tree = sample_cfg(tmp_path, "linear")
    tree["model"]["task"] = "generation"
    with pytest.raises(ConfigError, match="supports tasks"):
        validate_config(tree)


def test_bundle_with_tampered_labels_is_refused(tmp_path):
    res = run_experiment(validate_config(intent_cfg(tmp_path)), run_dir=tmp_path / "r")
    (res.bundle_dir / "labels.json").write_text(json.dumps(["x", "y", "z", "w"]))
    with pytest.raises(BundleError, match="labels do not match"):
        load_bundle(res.bundle_dir)
    (res.bundle_dir / "labels.json").unlink()
    with pytest.raises(BundleError, match="missing labels.json"):
        load_bundle(res.bundle_dir)


def test_cli_train_estimator(tmp_path):
    from typer.testing import CliRunner

    from chatforge.cli import app

    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(intent_cfg(tmp_path)))
    r = CliRunner().invoke(app, ["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "bundle" / "linear_weights.safetensors").is_file()


@pytest.mark.parametrize("name", ["xgboost_clinc150.yaml", "xgboost_chatbot_kr.yaml", "linear_clinc150.yaml",
                                  "linear_svm_clinc150.yaml", "ensemble_clinc150.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert get_family(cfg.model.family).kind == "estimator"


@pytest.mark.slow
def test_xgboost_clinc150_config_on_real_subset(tmp_path, shared_data):
    path = shared_data / "clinc150" / "data_full_trainval.json"
    if not path.is_file():
        pytest.skip(f"CLINC150 not found at {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    intents = sorted({y for _, y in data["train"]})[:10]
    per = {"train": 30, "val": 10, "oos_train": 30, "oos_val": 30}
    sub = {k: [r for i in [*intents, "oos"] for r in [r for r in data[k] if r[1] == i][: per[k]]] for k in per}
    small = tmp_path / "clinc_small.json"
    small.write_text(json.dumps(sub))
    cfg = load_config(REPO / "configs" / "xgboost_clinc150.yaml",
                      [f"data.path={small}", "model.n_estimators=20", "tracking.enabled=false",
                       f"output.dir={tmp_path}"])
    res = run_experiment(cfg, run_dir=tmp_path / "run")
    # loose bounds: 10 intents x 30 examples; the threshold is chosen on the same val (optimistic)
    assert res.metrics["valid_in_scope_accuracy"] >= 0.6 and res.metrics["valid_oos_recall"] >= 0.5
    assert np.isfinite(res.metrics["valid_accuracy"])
