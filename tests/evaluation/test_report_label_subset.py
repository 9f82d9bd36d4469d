"""A report on data with only some of the model's labels (held-out data, one intent's examples): macro-F1 averages
the labels that occur in the data or the predictions, as scikit-learn's ``f1_score(average="macro")`` does, and the
lowest-F1 table lists those labels only. Before, every label the model knows counted with F1 0, so 2 right answers
of 6 on a 30-intent model read macro-F1 0.05."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatforge.evaluation.report import write_classification_report


def test_macro_f1_over_the_labels_that_occur(tmp_path):
    from sklearn.metrics import f1_score

    labels = [f"intent_{i:02d}" for i in range(30)]
    y_true = ["intent_03", "intent_03", "intent_07", "intent_07", "intent_11", "intent_11"]
    y_pred = ["intent_03", "intent_07", "intent_07", "intent_07", "intent_11", "intent_20"]
    probs = np.full((len(y_true), len(labels)), 1.0 / len(labels))
    report = write_classification_report(tmp_path, y_true, y_pred, probs, labels, [f"t{i}" for i in range(6)])
    assert report["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert report["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert json.loads((tmp_path / "report.json").read_text())["macro_f1"] == pytest.approx(report["macro_f1"])
    md = (tmp_path / "report.md").read_text()
    lowest = md.split("## Lowest-F1 labels")[1]
    assert "intent_20" in lowest  # predicted though absent from the data: precision 0 counts
    assert "intent_00" not in lowest and "intent_29" not in lowest  # neither in the data nor predicted
    assert set(report["per_label"]) == set(labels)  # the per-label section still lists every label
