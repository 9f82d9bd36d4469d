"""Out-of-scope policies (Larson et al. 2019, section 4): oos-train, oos-threshold, oos-binary."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from chatforge.bundle import load_bundle
from chatforge.config import OOSConfig, validate_config
from chatforge.inference import load_model
from chatforge.oos import OOSError, OOSPolicy, fit_binary_detector, fit_policy
from chatforge.training.run import run_experiment

INTENTS = {
    "weather": ["weather", "rain", "sunny", "forecast", "temperature", "umbrella"],
    "flight": ["flight", "plane", "airport", "boarding", "airline", "ticket"],
    "music": ["song", "playlist", "music", "album", "guitar", "singer"],
}
OOS_WORDS = ["recipe", "volcano", "algebra", "pyramid", "knitting", "galaxy", "tax", "dinosaur"]
FILLER = ["please", "tell me about", "i want", "what is", "can you check", "now", "today", "the"]


def _sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join([rng.choice(FILLER), rng.choice(words), rng.choice(FILLER), rng.choice(words)])


def write_intent_data(path: Path, n_train: int = 12, n_val: int = 6, n_oos_train: int = 8, n_oos_val: int = 6,
                      seed: int = 0) -> Path:
    """A tiny CLINC150-shaped JSON file: 3 separable intents plus oos sentences from other words."""
    rng = random.Random(seed)
    data = {
        "train": [[_sentence(rng, w), k] for k, w in INTENTS.items() for _ in range(n_train)],
        "val": [[_sentence(rng, w), k] for k, w in INTENTS.items() for _ in range(n_val)],
        "oos_train": [[_sentence(rng, OOS_WORDS), "oos"] for _ in range(n_oos_train)],
        "oos_val": [[_sentence(rng, OOS_WORDS), "oos"] for _ in range(n_oos_val)],
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def intent_cfg(tmp_path: Path, family: str = "linear", oos: dict | None = None, name: str = "intent",
               **params) -> dict:
    data = write_intent_data(tmp_path / "intents.json")
    params = params or ({"C": 10.0, "max_iter": 200, "char_ngram_max": 3} if family == "linear" else {})
    tree = {
        "name": name, "seed": 0,
        "data": {"path": str(data), "format": "clinc150", "split": "predefined"},
        "model": {"family": family, "task": "classification", **params},
        "output": {"dir": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }
    if oos:
        tree["oos"] = oos
    return tree


def test_decide_threshold_hand_computed():
    labels = ["a", "b", "oos"]
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.1, 0.2, 0.7]])
    assert OOSPolicy().decide(probs, labels, ["x"] * 3) == ["a", "a", "oos"]  # oos-train: plain argmax
    thr = OOSPolicy(policy="threshold", threshold=0.5)
    assert thr.decide(probs, labels, ["x"] * 3) == ["a", "oos", "oos"]  # 0.4 < 0.5 -> oos


def test_fit_threshold_maximises_in_scope_plus_recall():
    labels = ["a", "b"]
    # in-scope examples are confident (>= 0.8), oos ones are not (<= 0.6): any threshold in (0.6, 0.8] is perfect
    probs = {"a1": [0.9, 0.1], "b1": [0.2, 0.8], "o1": [0.6, 0.4], "o2": [0.45, 0.55]}
    texts, y = list(probs), ["a", "b", "oos", "oos"]
    policy = fit_policy(OOSConfig(policy="threshold"), lambda t: np.array([probs[x] for x in t]), labels, texts, y)
    assert 0.6 < policy.threshold <= 0.8
    assert policy.valid_metrics["in_scope_accuracy"] == 1.0 and policy.valid_metrics["oos_recall"] == 1.0
    assert policy.decide(np.array([probs[x] for x in texts]), labels, texts) == y
    again = OOSPolicy.from_metadata(json.loads(json.dumps(policy.to_metadata())))
    assert again.threshold == policy.threshold and again.policy == "threshold"


def test_fit_threshold_respects_max_in_scope_drop_from_config():
    labels = ["a", "b"]
    # catching o1 (0.6) needs a threshold above the unsure but correct a2 (0.55)
    probs = {"a1": [0.9, 0.1], "b1": [0.2, 0.8], "a2": [0.55, 0.45], "o1": [0.6, 0.4]}
    texts, y = list(probs), ["a", "b", "a", "oos"]
    proba = lambda t: np.array([probs[x] for x in t])  # noqa: E731
    free = fit_policy(OOSConfig(policy="threshold"), proba, labels, texts, y)
    bounded = fit_policy(OOSConfig(policy="threshold", max_in_scope_drop=0.0), proba, labels, texts, y)
    assert free.threshold > 0.6 and free.valid_metrics["in_scope_accuracy"] < 1.0
    assert bounded.threshold <= 0.55 and bounded.valid_metrics["in_scope_accuracy"] == 1.0


def test_fixed_threshold_from_config_is_kept():
    policy = fit_policy(OOSConfig(policy="threshold", threshold=0.3), lambda t: None, ["a", "b"], [], [])
    assert policy.threshold == 0.3


def test_threshold_needs_oos_in_validation():
    with pytest.raises(OOSError, match="labelled 'oos'"):
        fit_policy(OOSConfig(policy="threshold"), lambda t: np.full((len(t), 2), 0.5), ["a", "b"], ["x"], ["a"])


def test_binary_detector_separates_oos():
    rng = random.Random(1)
    texts = [_sentence(rng, w) for w in INTENTS.values() for _ in range(10)] + [_sentence(rng, OOS_WORDS) for _ in range(10)]
    labels = ["in"] * 30 + ["oos"] * 10
    det = fit_binary_detector(texts, labels)
    assert det.labels == ["in_scope", "oos"]
    policy = OOSPolicy(policy="binary", detector=det)
    probe = ["tell me about the volcano recipe", "what is the weather forecast today"]
    p = policy.oos_probability(probe)
    assert p[0] > 0.5 > p[1]
    # the detector overrides the intent model's argmax only for the oos text
    assert policy.decide(np.array([[0.9, 0.1], [0.9, 0.1]]), ["weather", "flight"], probe) == ["oos", "weather"]
    with pytest.raises(OOSError, match="both in-scope"):
        fit_binary_detector(["a", "b"], ["x", "y"])


def test_unknown_policy_rejected_by_config(tmp_path):
    from chatforge.config import ConfigError

    with pytest.raises(ConfigError, match="oos.policy"):
        validate_config(intent_cfg(tmp_path, oos={"policy": "magic"}))


def test_oos_train_policy_end_to_end(tmp_path):
    res = run_experiment(validate_config(intent_cfg(tmp_path)), run_dir=tmp_path / "run")
    assert "oos" in json.loads((res.bundle_dir / "labels.json").read_text())
    assert res.metrics["valid_in_scope_accuracy"] >= 0.9 and res.metrics["valid_oos_recall"] is not None
    clf = load_model(res.bundle_dir, "intents")
    pred = clf.classify(["please volcano the galaxy tax", "what is rain now forecast"])
    assert pred[0].label == "oos" and pred[0].out_of_scope
    assert pred[1].label == "weather" and not pred[1].out_of_scope


def test_threshold_policy_stored_in_bundle_and_served(tmp_path):
    res = run_experiment(validate_config(intent_cfg(tmp_path, oos={"policy": "threshold"})), run_dir=tmp_path / "r")
    meta = json.loads((res.bundle_dir / "metadata.json").read_text())
    t = meta["oos"]["threshold"]
    assert meta["oos"]["policy"] == "threshold" and 0.0 <= t < 1.0 and res.metrics["oos_threshold"] == t
    clf = load_model(res.bundle_dir, "intents")
    assert clf.oos.threshold == t
    # forcing an impossible threshold makes every answer out of scope: the served answer follows metadata
    clf.oos.threshold = 1.01
    assert all(p.out_of_scope and p.label == "oos" for p in clf.classify(["what is rain now forecast"]))


def test_binary_policy_composite_bundle(tmp_path):
    res = run_experiment(validate_config(intent_cfg(tmp_path, oos={"policy": "binary"})), run_dir=tmp_path / "r")
    assert (res.bundle_dir / "oos_detector" / "linear_meta.json").is_file()
    b = load_bundle(res.bundle_dir)
    assert "oos" not in b.labels  # the intent model saw in-scope examples only
    clf = load_model(res.bundle_dir, "intents")
    pred = clf.classify(["please volcano the galaxy tax", "i want a plane ticket now airport"])
    assert pred[0].out_of_scope and pred[0].label == "oos"
    assert pred[1].label == "flight" and not pred[1].out_of_scope
    assert res.metrics["valid_oos_recall"] >= 0.5
