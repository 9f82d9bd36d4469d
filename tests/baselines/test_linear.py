"""The linear baseline's SVM loss: sklearn LinearSVC decisions, softmax(temperature * margin) probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from chatforge.baselines.linear import LinearConfig, LinearTextClassifier

TEXTS = ["book a table for two", "reserve a table tonight", "table for four please",
         "what is the weather", "will it rain tomorrow", "weather forecast for monday",
         "play some jazz", "put on a song", "play music by queen"]
LABELS = ["book"] * 3 + ["weather"] * 3 + ["music"] * 3
QUERIES = ["a table for six", "is it going to rain", "play a song", "forecast please"]


def test_svm_matches_sklearn_linear_svc_and_probs_are_a_tempered_softmax():
    from sklearn.svm import LinearSVC

    cfg = LinearConfig(loss="svm", C=1.0, temperature=7.0, char_ngram_max=3)
    clf = LinearTextClassifier(cfg).fit(TEXTS, LABELS)
    ref = LinearSVC(C=1.0, random_state=0).fit(clf._features(TEXTS), LABELS)
    x = clf._features(QUERIES)
    assert clf.predict(QUERIES) == list(ref.predict(x))
    margins = ref.decision_function(x) * 7.0
    expected = np.exp(margins - margins.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(clf.predict_proba(QUERIES), expected, atol=1e-5)
    assert clf.predict(QUERIES)[:3] == ["book", "weather", "music"]


def test_temperature_sharpens_without_changing_the_ranking():
    soft = LinearTextClassifier(LinearConfig(loss="svm", temperature=1.0, char_ngram_max=3)).fit(TEXTS, LABELS)
    sharp = LinearTextClassifier(LinearConfig(loss="svm", temperature=50.0, char_ngram_max=3)).fit(TEXTS, LABELS)
    ps, pt = soft.predict_proba(QUERIES), sharp.predict_proba(QUERIES)
    assert (ps.argsort(1) == pt.argsort(1)).all()
    assert (pt.max(1) > ps.max(1)).all()


def test_svm_binary_and_save_load_round_trip(tmp_path):
    two = [y if y == "book" else "other" for y in LABELS]
    clf = LinearTextClassifier(LinearConfig(loss="svm", char_ngram_max=3)).fit(TEXTS, two)
    p = clf.predict_proba(QUERIES)
    assert p.shape == (4, 2) and np.allclose(p.sum(1), 1.0)
    assert clf.predict(QUERIES[:1]) == ["book"]
    clf.save(tmp_path)
    back = LinearTextClassifier.load(tmp_path)
    assert back.config.loss == "svm"
    np.testing.assert_allclose(back.predict_proba(QUERIES), p, atol=1e-6)


def test_unknown_loss_is_rejected_naming_the_choices():
    with pytest.raises(ValidationError, match="logistic.*svm|svm.*logistic"):
        LinearConfig(loss="hinge")
