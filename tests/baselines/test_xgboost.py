"""XGBoost TF-IDF baseline: learns, round-trips through JSON, validates its config, registers."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from pydantic import ValidationError

from chatforge.baselines.xgboost import XGBoostConfig, XGBoostTextClassifier, build
from chatforge.oos import OOSPolicy
from chatforge.registry import _FAMILIES, BuildContext, SpecialIds, build_model

TEXTS = [
    "book a flight to paris", "i need plane tickets", "flight to tokyo tomorrow", "cheapest flight to rome",
    "what is the weather", "will it rain today", "weather forecast for tomorrow", "is it sunny outside",
    "play some music", "put on a song", "play jazz music", "start my playlist",
]
LABELS = ["flight"] * 4 + ["weather"] * 4 + ["music"] * 4
TINY = XGBoostConfig(n_estimators=30, max_depth=3, max_features=500)


@pytest.fixture(scope="module")
def fitted() -> XGBoostTextClassifier:
    return XGBoostTextClassifier(TINY).fit(TEXTS, LABELS)


def test_learns_separable_task(fitted):
    assert fitted.labels == ["flight", "music", "weather"]
    assert fitted.predict(TEXTS) == LABELS
    probs = fitted.predict_proba(TEXTS)
    assert probs.shape == (12, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    pred = fitted.classify(["play music"])[0]
    assert pred.label == "music" and not pred.out_of_scope and pred.scores["music"] == pytest.approx(pred.score)


def test_save_load_identical_probabilities_without_pickle(fitted, tmp_path):
    fitted.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectorizers.json", "xgb_meta.json", "xgb_model.json"]
    for p in tmp_path.iterdir():
        json.loads(p.read_text())  # all JSON, nothing pickled
    loaded = XGBoostTextClassifier.load(tmp_path)
    probe = TEXTS + ["an unseen sentence about jazz flights", ""]
    assert np.abs(loaded.predict_proba(probe) - fitted.predict_proba(probe)).max() < 1e-6
    assert loaded.labels == fitted.labels and loaded.config == fitted.config


def test_binary_task_and_early_stopping(tmp_path):
    model = XGBoostTextClassifier(XGBoostConfig(n_estimators=200, max_depth=2, early_stopping_rounds=3))
    flipped = ["weather" if y == "flight" else "flight" for y in LABELS[:8]]
    # validation labels are the training labels flipped, so validation loss rises from round 0 on
    model.fit(TEXTS[:8], LABELS[:8], valid_texts=TEXTS[:8], valid_labels=flipped)
    assert model.best_iteration == 0
    assert model._booster.num_boosted_rounds() == 4  # best round + 3 patience rounds, not 200
    assert model.predict_proba(TEXTS[:8]).shape == (8, 2)
    model.save(tmp_path)
    loaded = XGBoostTextClassifier.load(tmp_path)
    assert loaded.best_iteration == 0
    assert np.abs(loaded.predict_proba(TEXTS) - model.predict_proba(TEXTS)).max() < 1e-6


def test_oos_comes_from_the_bundle_policy_not_the_estimator(fitted, tmp_path, caplog):
    """One out-of-scope path: the bundle's OOSPolicy decides for XGBoost as for every family; a threshold
    saved by the estimator itself (xgb_meta.json written before) is reported and no longer applied."""
    policy = OOSPolicy(policy="threshold", threshold=1.01)  # nothing is that confident
    assert policy.decide(fitted.predict_proba(TEXTS[:3]), fitted.labels, TEXTS[:3]) == ["oos"] * 3
    fitted.save(tmp_path)
    meta = json.loads((tmp_path / "xgb_meta.json").read_text())
    assert "oos_threshold" not in meta
    (tmp_path / "xgb_meta.json").write_text(json.dumps({**meta, "oos_label": "oos", "oos_threshold": 1.01}))
    with caplog.at_level(logging.WARNING):
        loaded = XGBoostTextClassifier.load(tmp_path)
    assert "no longer applied" in caplog.text and "oos.policy: threshold" in caplog.text
    assert loaded.predict(TEXTS[:3]) == LABELS[:3]
    assert not any(p.out_of_scope for p in loaded.classify(TEXTS[:3]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_depth": 0}, "max_depth"), ({"learning_rate": 1.5}, "learning_rate"),
     ({"tree_method": "gpu"}, "tree_method"), ({"n_estimator": 10}, "n_estimator"),
     ({"char_ngram_min": 6}, "char_ngram_max")],
)
def test_bad_config_rejected_naming_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        XGBoostConfig(**kwargs)


def test_bad_inputs_have_clear_errors(fitted, tmp_path):
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        XGBoostTextClassifier(TINY).fit(["a", "b"], ["x", "x"])
    with pytest.raises(ValueError, match="absent from training labels"):
        XGBoostTextClassifier(TINY).fit(TEXTS, LABELS, ["hi"], ["greeting"])
    with pytest.raises(TypeError, match="single string"):
        fitted.predict("play music")
    with pytest.raises(RuntimeError, match="not fitted"):
        XGBoostTextClassifier(TINY).predict(["x"])
    with pytest.raises(FileNotFoundError, match="xgb_model.json"):
        XGBoostTextClassifier.load(tmp_path)


def test_registered_as_estimator_family():
    spec = _FAMILIES["xgboost"]
    assert spec.kind == "estimator" and spec.tasks == ("classification",) and spec.config_cls is XGBoostConfig
    ctx = BuildContext(task="classification", vocab_size=0, special=SpecialIds(), num_labels=3)
    model = build(XGBoostConfig(n_estimators=5), ctx)
    assert isinstance(model, XGBoostTextClassifier) and model.config.n_estimators == 5
    # Config flows one way, typed: the builder takes exactly the family's config class, never a dict.
    with pytest.raises(TypeError, match="built from a XGBoostConfig, not dict"):
        build_model("xgboost", {"n_estimators": 5}, ctx)


@pytest.mark.slow
def test_clinc150_subset_accuracy(shared_data):
    path = shared_data / "clinc150" / "data_full_trainval.json"
    if not path.is_file():
        pytest.skip(f"CLINC150 not found at {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    intents = set(sorted({y for _, y in data["train"]})[:20])
    train = [(t, y) for t, y in data["train"] if y in intents]
    val = [(t, y) for t, y in data["val"] if y in intents]
    model = XGBoostTextClassifier(XGBoostConfig(n_estimators=50, max_depth=4, max_features=5000))
    model.fit([t for t, _ in train], [y for _, y in train])
    acc = np.mean([p == y for p, (_, y) in zip(model.predict([t for t, _ in val]), val, strict=True)])
    # measured 0.9225 on 20 intents x 20 val examples; the margin absorbs library-version drift
    assert acc >= 0.85
