"""Report writers: every file is written, parses, and no temp file is left behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from chatforge.evaluation import plots
from chatforge.evaluation.report import (
    atomic_write_text,
    write_classification_report,
    write_generation_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _no_temp_files(d):
    return [p.name for p in d.iterdir() if ".tmp" in p.name]


def test_classification_report_writes_all_files(tmp_path):
    labels = ["alarm", "oos", "weather"]
    texts = ["wake me at 7", "tell me a joke", "is it sunny", "set an alarm", "rain today?"]
    y_true = ["alarm", "oos", "weather", "alarm", "weather"]
    y_pred = ["alarm", "weather", "weather", "oos", "weather"]
    probs = np.array([
        [0.8, 0.1, 0.1],
        [0.1, 0.2, 0.7],
        [0.1, 0.1, 0.8],
        [0.3, 0.6, 0.1],
        [0.2, 0.1, 0.7],
    ])
    m = write_classification_report(tmp_path, y_true, y_pred, probs, labels, texts, oos_label="oos", title="tiny")
    expected = {"report.json", "errors.json", "report.md", "confusion_matrix.png", "confidence_histogram.png"}
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert _no_temp_files(tmp_path) == []

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(3 / 5) == m["accuracy"]
    assert report["oos"]["in_scope_accuracy"] == pytest.approx(3 / 4)
    assert report["oos"]["oos_recall"] == 0.0
    assert report["per_label"]["alarm"]["confused_with"] == {"oos": 1}
    assert set(report["per_label"]["alarm"]) >= {"precision", "recall", "f1-score", "support"}

    errors = json.loads((tmp_path / "errors.json").read_text())
    assert [e["text"] for e in errors] == ["tell me a joke", "set an alarm"]  # confidence 0.7 then 0.6
    assert errors[0] == {"text": "tell me a joke", "true": "oos", "pred": "weather", "confidence": pytest.approx(0.7)}

    md = (tmp_path / "report.md").read_text()
    assert "| metric | value |" in md and "| in-scope accuracy | 0.7500 |" in md
    assert "| oos | weather | 1 |" in md
    for png in ("confusion_matrix.png", "confidence_histogram.png"):
        data = (tmp_path / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_classification_report_without_probs_and_thresholded_oos(tmp_path):
    # "oos" predicted by a threshold on a model without an oos column: confidence = max prob
    m = write_classification_report(
        tmp_path, ["a", "b"], ["oos", "b"], np.array([[0.4, 0.6], [0.1, 0.9]]), ["a", "b"], ["x", "y"]
    )
    assert "oos" in m["labels"]
    assert json.loads((tmp_path / "errors.json").read_text())[0]["confidence"] == pytest.approx(0.6)
    out2 = tmp_path / "noprobs"
    write_classification_report(out2, ["a"], ["a"], None, ["a"], ["x"])
    assert not (out2 / "confidence_histogram.png").exists()
    with pytest.raises(ValueError, match="shape"):
        write_classification_report(tmp_path, ["a"], ["a"], np.ones((1, 3)), ["a", "b"], ["x"])


def test_confusion_plot_150_labels_keeps_top_confused():
    rng = np.random.default_rng(0)
    k = 150
    cm = np.diag(rng.integers(5, 20, k))
    cm[3, 7] = 9
    cm[120, 4] = 5
    labels = [f"intent_{i:03d}" for i in range(k)]
    top = plots.most_confused_labels(cm, labels, top_k=4)
    assert set(top) == {3, 7, 120, 4}
    png = plots.confusion_matrix_png(cm, labels, top_k=25)
    assert png.startswith(PNG_MAGIC)


def test_generation_report(tmp_path):
    src = ["hi", "how are you"]
    hyps = ["hello there", "i am fine | thanks"]
    m = write_generation_report(tmp_path, src, hyps, hyps, nll=2 * np.log(4.0), n_tokens=2)
    assert m["bleu"] == pytest.approx(100.0)
    assert m["perplexity"] == pytest.approx(4.0)
    assert m["distinct_1"] == pytest.approx(1.0)
    assert m["avg_length"] == pytest.approx(3.5)  # 2 and 5 whitespace tokens
    assert json.loads((tmp_path / "generation_report.json").read_text())["samples"][1]["hyp"] == hyps[1]
    md = (tmp_path / "generation_report.md").read_text()
    assert "| source | reply | reference |" in md and "i am fine &#124; thanks" in md  # pipe escaped (as an entity)
    assert _no_temp_files(tmp_path) == []
    with pytest.raises(ValueError, match="both nll and n_tokens"):
        write_generation_report(tmp_path, src, hyps, hyps, nll=1.0)


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _no_temp_files(tmp_path) == []
