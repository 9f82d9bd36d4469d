"""Outlier exposure for the linear baseline (model.outliers, Hendrycks et al. 2019)."""

from __future__ import annotations

import pytest
from tests.test_oos import OOS_WORDS, intent_cfg

from chatforge.baselines.linear import LinearConfig, LinearTextClassifier
from chatforge.baselines.linear.model import BACKGROUND
from chatforge.config import validate_config
from chatforge.training.run import load_splits

OUTLIERS = [f"the {w} of the {v} was built in the old days" for w in OOS_WORDS for v in OOS_WORDS]


def _data(tmp_path):
    train, _, _, _ = load_splits(validate_config(intent_cfg(tmp_path)))
    return [e.text for e in train], [e.label for e in train]


@pytest.mark.parametrize("loss", ["svm", "logistic"])
def test_outliers_flatten_the_answer_and_never_become_a_label(tmp_path, loss):
    texts, labels = _data(tmp_path)
    (tmp_path / "wiki.txt").write_text("\n".join(OUTLIERS) + "\n\n", encoding="utf-8")
    base = dict(loss=loss, C=1.0, max_iter=500, char_ngram_max=3)
    plain = LinearTextClassifier(LinearConfig(**base)).fit(texts, labels)
    oe = LinearTextClassifier(LinearConfig(**base, outliers=str(tmp_path / "wiki.txt"), outlier_weight=1.0))
    oe.fit(texts, labels)
    assert oe.labels == plain.labels and BACKGROUND not in oe.labels
    probe = ["the volcano of the pyramid was built in the old days", "the tax of the galaxy was built"]
    # no in-scope class, oos included, may claim an outlier confidently any more
    assert (oe.predict_proba(probe).max(axis=1) < plain.predict_proba(probe).max(axis=1)).all()
    # in-scope answers stay
    assert oe.predict(["what is the rain forecast today", "book a flight to the airport"]) == ["weather", "flight"]


def test_outlier_exposure_survives_save_and_load(tmp_path):
    texts, labels = _data(tmp_path)
    (tmp_path / "wiki.txt").write_text("\n".join(OUTLIERS), encoding="utf-8")
    oe = LinearTextClassifier(LinearConfig(loss="svm", C=1.0, char_ngram_max=3, outliers=str(tmp_path / "wiki.txt")))
    oe.fit(texts, labels)
    back = LinearTextClassifier.load(oe.save(tmp_path / "m"))
    assert back.labels == oe.labels
    assert (back.predict_proba(OUTLIERS[:5]) == oe.predict_proba(OUTLIERS[:5])).all()


def test_two_real_classes_keep_the_binary_layout(tmp_path):
    (tmp_path / "wiki.txt").write_text("\n".join(OUTLIERS), encoding="utf-8")
    texts = ["rain forecast today", "sunny weather now", "flight ticket airport", "plane boarding airline"] * 3
    labels = ["weather", "weather", "flight", "flight"] * 3
    m = LinearTextClassifier(LinearConfig(C=10.0, outliers=str(tmp_path / "wiki.txt"))).fit(texts, labels)
    assert m.labels == ["flight", "weather"] and m.predict(["rain today", "airport ticket"]) == ["weather", "flight"]
    assert LinearTextClassifier.load(m.save(tmp_path / "m")).labels == m.labels


def test_missing_or_empty_outlier_file_is_named(tmp_path):
    texts, labels = _data(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.outliers: file not found"):
        LinearTextClassifier(LinearConfig(outliers=str(tmp_path / "nope.txt"))).fit(texts, labels)
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no sentences"):
        LinearTextClassifier(LinearConfig(outliers=str(tmp_path / "empty.txt"))).fit(texts, labels)
