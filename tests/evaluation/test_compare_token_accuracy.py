"""`chatforge compare --metric accuracy`: a generation or language-model run's metrics.json ``valid_accuracy`` is
next-token accuracy, not the share of examples answered right, so it is left out of the ``accuracy`` column
(its loss, chrF and BLEU columns remain). Before, a chatbot's token accuracy was ranked among intent
classifiers' accuracies."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from chatforge.evaluation.compare import build_leaderboard, collect_runs


def _run(root: Path, name: str, task: str, metrics: dict) -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "model": {"family": "transformer", "task": task},
                                                     "data": {"split": "random"}}))
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_token_accuracy_is_not_classification_accuracy(tmp_path):
    _run(tmp_path, "chat", "generation", {"valid_accuracy": 0.97, "valid_loss": 1.2, "best_valid_loss": 1.2})
    _run(tmp_path, "lm", "lm", {"valid_accuracy": 0.99})
    _run(tmp_path, "intent", "classification", {"valid_accuracy": 0.90})
    lb = build_leaderboard(collect_runs(runs_dir=tmp_path), metric="accuracy")
    rows = {r["run"]: r for r in lb.rows}
    assert rows["intent"]["accuracy"] == 0.90 and lb.rows[0]["run"] == "intent"
    assert rows["chat"]["accuracy"] is None and rows["lm"]["accuracy"] is None
    assert rows["chat"]["valid_loss"] == 1.2
