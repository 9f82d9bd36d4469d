"""Metrics against hand-computed values on tiny hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chatforge.evaluation.metrics import (
    apply_oos_threshold,
    average_length,
    choose_oos_threshold,
    classification_metrics,
    confidence_histogram,
    corpus_bleu,
    distinct_n,
    oos_metrics,
    perplexity,
)

Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]


def test_classification_metrics_by_hand():
    m = classification_metrics(Y_TRUE, Y_PRED)
    assert m["labels"] == ["a", "b", "c"]
    # rows = true, cols = predicted
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    a, b, c = (m["per_label"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((1.0, 2 / 3, 0.8, 3))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((0.5, 1.0, 2 / 3, 1))
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((0.8 * 3 + 0.5 * 2 + 2 / 3 * 1) / 6)
    assert m["top_confusions"] == [
        {"true": "a", "pred": "b", "count": 1},
        {"true": "b", "pred": "c", "count": 1},
    ]


def test_classification_metrics_label_order_and_never_predicted_label():
    m = classification_metrics(["x", "y"], ["x", "x"], labels=["y", "x", "z"])
    assert m["labels"] == ["y", "x", "z"]
    assert m["confusion_matrix"] == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert m["per_label"]["y"]["precision"] == 0.0  # never predicted: zero_division -> 0
    assert m["per_label"]["z"]["support"] == 0
    assert m["top_confusions"][0] == {"true": "y", "pred": "x", "count": 1}


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    labels = list("pqrst")
    yt = [labels[i] for i in rng.integers(0, 5, 200)]
    yp = [y if rng.random() < 0.6 else labels[j] for y, j in zip(yt, rng.integers(0, 5, 200), strict=True)]
    m = classification_metrics(yt, yp, labels=labels)
    assert m["macro_f1"] == pytest.approx(f1_score(yt, yp, labels=labels, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(yt, yp, labels=labels, average="weighted"))


def test_classification_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        classification_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="not in labels"):
        classification_metrics(["a"], ["b"], labels=["a"])


def test_oos_metrics_larson_definitions():
    y_true = ["a", "b", "oos", "oos", "oos", "a"]
    y_pred = ["a", "oos", "oos", "a", "oos", "b"]
    m = oos_metrics(y_true, y_pred)
    assert m["in_scope_accuracy"] == pytest.approx(1 / 3)  # only index 0 of in-scope {0, 1, 5}
    assert m["oos_recall"] == pytest.approx(2 / 3)
    assert m["oos_precision"] == pytest.approx(2 / 3)
    assert (m["n_in_scope"], m["n_oos"], m["n_pred_oos"]) == (3, 3, 3)
    assert oos_metrics(["a"], ["a"])["oos_recall"] is None  # undefined, not NaN


def test_apply_oos_threshold():
    labels = ["a", "b", "oos"]
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.2, 0.7]])
    assert apply_oos_threshold(probs, labels, 0.0) == ["a", "a", "oos"]  # plain argmax
    assert apply_oos_threshold(probs, labels, 0.5) == ["a", "oos", "oos"]
    with pytest.raises(ValueError, match="shape"):
        apply_oos_threshold(probs, ["a", "b"], 0.5)


def test_choose_oos_threshold_finds_known_threshold():
    labels = ["a", "b"]  # model without an oos class: oos only via the threshold
    probs = np.array([
        [0.9, 0.1], [0.2, 0.8], [0.7, 0.3],  # in-scope, correct, max >= 0.7
        [0.5, 0.5], [0.45, 0.55], [0.6, 0.4],  # oos, max <= 0.6
    ])
    y_true = ["a", "b", "a", "oos", "oos", "oos"]
    t, m = choose_oos_threshold(probs, y_true, labels)
    # every threshold in (0.6, 0.7] separates perfectly; the smallest grid point there is 0.61
    assert t == pytest.approx(0.61)
    assert m["in_scope_accuracy"] == 1.0 and m["oos_recall"] == 1.0
    assert m["criterion"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="in-scope and 'oos'"):
        choose_oos_threshold(probs[:3], y_true[:3], labels)


def test_choose_oos_threshold_bounds_the_in_scope_accuracy_it_gives_up():
    labels = ["a", "b"]
    # 4 in-scope examples, one of them correct but unsure (0.55); 2 oos examples at 0.6 and 0.52.
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.55, 0.45], [0.6, 0.4], [0.48, 0.52]])
    y_true = ["a", "b", "a", "a", "oos", "oos"]
    t, m = choose_oos_threshold(probs, y_true, labels)  # equal weights: lose 1/4 accuracy for all the recall
    assert t == pytest.approx(0.61) and m["in_scope_accuracy"] == 0.75 and m["oos_recall"] == 1.0
    t, m = choose_oos_threshold(probs, y_true, labels, max_in_scope_drop=0.1)
    # within a 10-point loss only thresholds up to 0.55 qualify: the 0.52 example is caught, not the 0.6 one
    assert t == pytest.approx(0.53) and m["in_scope_accuracy"] == 1.0 and m["oos_recall"] == 0.5
    t, m = choose_oos_threshold(probs[[0, 1, 3, 4]], [y_true[i] for i in (0, 1, 3, 4)], labels, max_in_scope_drop=0.0)
    assert t == pytest.approx(0.0) and m["oos_recall"] == 0.0  # any threshold that helps costs accuracy
    with pytest.raises(ValueError, match="max_in_scope_drop must be in"):
        choose_oos_threshold(probs, y_true, labels, max_in_scope_drop=2.0)


def test_distinct_n_average_length_perplexity():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # (a b) x3, (b a), (b c)
    assert distinct_n(["한국어"], 1, tokenizer=list) == pytest.approx(1.0)
    assert distinct_n(["a"], 2) == 0.0
    assert average_length(texts) == pytest.approx(3.5)
    assert perplexity(math.log(10) * 5, 5) == pytest.approx(10.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="total_tokens"):
        perplexity(1.0, 0)


def test_bleu_sanity():
    hyps = ["the cat sat on the mat", "a quick brown fox jumps"]
    assert corpus_bleu(hyps, hyps) == pytest.approx(100.0)
    assert corpus_bleu(hyps, ["zz yy xx ww vv uu", "qq rr ss tt oo"]) < 1.0
    assert corpus_bleu(hyps, [[h, "other"] for h in hyps]) == pytest.approx(100.0)  # multi-reference
    ko = ["오늘 날씨 좋네요", "밥 먹었어요"]
    assert corpus_bleu(ko, ko, tokenize="char") == pytest.approx(100.0)
    with pytest.raises(ValueError, match="same length"):
        corpus_bleu(hyps, hyps[:1])


def test_confidence_histogram_by_hand():
    h = confidence_histogram([0.05, 0.15, 0.95, 1.0], [True, False, True, False], bins=10)
    assert h["correct"] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert h["wrong"] == [0, 1, 0, 0, 0, 0, 0, 0, 0, 1]  # 1.0 falls in the last bin
    assert h["accuracy"][9] == pytest.approx(0.5)
    assert h["mean_confidence"][9] == pytest.approx(0.975)
    assert h["ece"] == pytest.approx(0.25 * 0.95 + 0.25 * 0.15 + 0.5 * 0.475)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        confidence_histogram([1.5], [True])
