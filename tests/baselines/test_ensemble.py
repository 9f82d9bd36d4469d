"""Ensembles: averaging and stacking beat their members on a constructed case; bundles are self-contained."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from pydantic import ValidationError
from tests.test_oos import intent_cfg

from chatforge.baselines.ensemble import EnsembleClassifier, EnsembleConfig, EnsembleError
from chatforge.bundle import load_bundle
from chatforge.config import validate_config
from chatforge.inference import load_model
from chatforge.training.run import run_experiment

LABELS = ["a", "b", "c"]
TEXTS = [f"t{i}" for i in range(12)]
TRUE = [LABELS[i % 3] for i in range(12)]


class TableMember:
    """A member answering from a lookup table: confident where it is right, hesitant where wrong."""

    def __init__(self, right: set[int], labels=LABELS):
        self.labels = list(labels)
        self.right = right

    def predict_proba(self, texts):
        out = []
        for t in texts:
            i = int(t[1:])
            y = LABELS.index(TRUE[i])
            row = np.full(len(self.labels), 0.05)
            if i in self.right:
                row[self.labels.index(LABELS[y])] = 0.9
            else:  # wrong, but only just: the true label is a close second
                row[self.labels.index(LABELS[(y + 1) % 3])] = 0.5
                row[self.labels.index(LABELS[y])] = 0.45
            out.append(row / row.sum())
        return np.array(out)


def _acc(model) -> float:
    return float(np.mean([LABELS[i] == y for i, y in zip(model.predict_proba(TEXTS).argmax(1), TRUE, strict=True)])) \
        if not hasattr(model, "predict") else float(np.mean([p == y for p, y in zip(model.predict(TEXTS), TRUE, strict=True)]))


def _members():
    # each member is right on a different half of the examples
    return [TableMember(set(range(6))), TableMember(set(range(6, 12)), labels=["c", "a", "b"])]


def test_average_beats_best_member_on_constructed_case():
    members = _members()
    best = max(_acc(m) for m in members)
    assert best == 0.5
    ens = EnsembleClassifier.from_members(members, EnsembleConfig(members=["m0", "m1"]))
    assert ens.labels == LABELS  # member columns re-ordered to the ensemble's labels
    assert _acc(ens) == 1.0 >= best
    np.testing.assert_allclose(ens.predict_proba(TEXTS).sum(1), 1.0, atol=1e-6)


def test_weighted_average_follows_weights():
    ens = EnsembleClassifier.from_members(_members(), EnsembleConfig(members=["m0", "m1"], weights=[1.0, 0.0]))
    assert ens.weights == [1.0, 0.0]
    np.testing.assert_allclose(ens.predict_proba(TEXTS), _members()[0].predict_proba(TEXTS), atol=1e-6)


def _geometric_reference(probs, weights):
    """The weighted geometric mean, renormalised, one row at a time in plain Python (math.prod)."""
    import math

    out = []
    for rows in zip(*probs, strict=True):
        g = [math.prod(max(float(r[c]), 1e-12) ** w for r, w in zip(rows, weights, strict=True))
             for c in range(len(rows[0]))]
        out.append([v / sum(g) for v in g])
    return np.array(out)


@pytest.mark.parametrize("weights", [None, [3.0, 1.0]])
def test_geometric_pooling_matches_a_per_row_reference(weights):
    members = _members()
    ens = EnsembleClassifier.from_members(members, EnsembleConfig(members=["m0", "m1"], method="geometric",
                                                                  weights=weights))
    w = [x / sum(weights or [1, 1]) for x in (weights or [1, 1])]
    p = [m.predict_proba(TEXTS)[:, [m.labels.index(v) for v in LABELS]] for m in members]
    got = ens.predict_proba(TEXTS)
    np.testing.assert_allclose(got, _geometric_reference(p, w), atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    assert _acc(ens) == 1.0  # the constructed case: each member's confident half wins


def test_geometric_pooling_lets_a_member_veto_where_the_mean_lets_the_surest_decide():
    """Member 0 is sure of "a" (0.90 / 0.09 / 0.01); member 1 all but rules "a" out (0.001 / 0.699 / 0.30). The
    arithmetic mean follows the surest member (a 0.45 against b 0.39); the geometric mean picks the class both
    find plausible (b: sqrt(0.09 * 0.699) = 0.25 against a: sqrt(0.9 * 0.001) = 0.03)."""

    class Fixed:
        def __init__(self, row):
            self.labels, self.row = LABELS, np.array(row)

        def predict_proba(self, texts):
            return np.tile(self.row, (len(texts), 1))

    members = [Fixed([0.90, 0.09, 0.01]), Fixed([0.001, 0.699, 0.30])]
    cfg = dict(members=["m0", "m1"])
    avg = EnsembleClassifier.from_members(members, EnsembleConfig(**cfg)).predict(["x"])
    geo = EnsembleClassifier.from_members(members, EnsembleConfig(**cfg, method="geometric")).predict(["x"])
    assert avg == ["a"] and geo == ["b"]


def test_geometric_pooling_survives_a_zero_probability():
    class Zero:
        labels = LABELS

        def predict_proba(self, texts):
            return np.array([[1.0, 0.0, 0.0]] * len(texts))

    ens = EnsembleClassifier.from_members([Zero(), _members()[0]], EnsembleConfig(members=["m0", "m1"],
                                                                                  method="geometric"))
    p = ens.predict_proba(TEXTS)
    assert np.isfinite(p).all() and (p.argmax(1) == 0).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)


def test_stacking_matches_or_beats_best_member():
    ens = EnsembleClassifier.from_members(_members(), EnsembleConfig(members=["m0", "m1"], method="stacking", C=100.0))
    ens.fit_meta(TEXTS, TRUE)
    assert _acc(ens) >= 0.5 and _acc(ens) == 1.0
    assert json.dumps(ens.meta)  # meta-learner weights are plain JSON


def test_label_sets_must_agree():
    with pytest.raises(EnsembleError, match=r"label sets must agree.*only in m1: \['d'\]"):
        EnsembleClassifier.from_members([TableMember(set()), TableMember(set(), labels=["a", "b", "d"])],
                                        EnsembleConfig(members=["m0", "m1"]), paths=["m0", "m1"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"members": ["one"]}, "at least 2"),
    ({"members": ["a", "b"], "weights": [1.0]}, "one weight per member"),
    ({"members": ["a", "b"], "weights": [-1.0, 2.0]}, ">= 0"),
    ({"members": ["a", "b"], "method": "stacking", "weights": [1.0, 1.0]}, "'average' and 'geometric' only"),
    ({"members": ["a", "b"], "method": "vote"}, "method"),
])
def test_bad_config_rejected(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        EnsembleConfig(**kwargs)


@pytest.mark.parametrize("method", ["average", "geometric", "stacking"])
def test_ensemble_bundle_end_to_end(tmp_path, method):
    m1 = run_experiment(validate_config(intent_cfg(tmp_path, name="m1")), run_dir=tmp_path / "m1")
    m2 = run_experiment(validate_config(intent_cfg(tmp_path, name="m2", C=1.0, max_iter=200, word_ngram_max=1,
                                                   char_ngram_max=4)), run_dir=tmp_path / "m2")
    tree = intent_cfg(tmp_path, family="ensemble", name="ens", members=[str(tmp_path / "m1"), str(m2.bundle_dir)],
                      method=method)
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "ens")
    assert (res.bundle_dir / "ensemble.json").is_file()
    assert (res.bundle_dir / "members" / "0" / "linear_weights.safetensors").is_file()
    assert json.loads((res.bundle_dir / "metadata.json").read_text())["kind"] == "estimator"
    members = [load_model(m.bundle_dir, "m") for m in (m1, m2)]
    texts = ["what is rain now forecast", "please volcano the galaxy tax", "i want a plane ticket"]
    if method == "average":
        expected = (members[0].predict_proba(texts) + members[1].predict_proba(texts)) / 2
        np.testing.assert_allclose(load_bundle(res.bundle_dir).model.predict_proba(texts), expected, atol=1e-6)
    if method == "geometric":
        expected = _geometric_reference([m.predict_proba(texts) for m in members], [0.5, 0.5])
        np.testing.assert_allclose(load_bundle(res.bundle_dir).model.predict_proba(texts), expected, atol=1e-6)
    best = max(m1.metrics["valid_accuracy"], m2.metrics["valid_accuracy"])
    assert res.metrics["valid_accuracy"] >= best - 1e-9 or method == "stacking"  # stacking fits on valid itself
    # self-contained: the members' own runs can disappear
    shutil.rmtree(tmp_path / "m1")
    shutil.rmtree(tmp_path / "m2")
    served = load_model(res.bundle_dir, "ens").classify(texts)
    assert [p.label for p in served] == ["weather", "oos", "flight"]


def test_missing_member_bundle_fails_clearly(tmp_path):
    tree = intent_cfg(tmp_path, family="ensemble", name="ens", members=[str(tmp_path / "x"), str(tmp_path / "y")])
    with pytest.raises(EnsembleError, match="not found"):
        run_experiment(validate_config(tree), run_dir=tmp_path / "ens")
