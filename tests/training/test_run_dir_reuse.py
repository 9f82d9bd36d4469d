"""A new run into the folder of an earlier one (`chatforge train --run-dir` again) must not mix with it: no stale
checkpoint for `--resume` to load into the new config, no earlier bundle, metrics or evaluations beside the new
config.yaml, even when the new run fails before it writes its own."""

from __future__ import annotations

import pytest

from chatforge.config import ConfigError, validate_config
from chatforge.training.checkpoint import checkpoint_path
from chatforge.training.run import run_experiment


def _cfg(data_path: str):
    return validate_config({
        "name": "reuse", "data": {"path": data_path},
        "tokenizer": {"vocab_size": 600},
        "model": {"family": "transformer", "task": "classification", "d_model": 16, "n_heads": 2,
                  "num_encoder_layers": 1, "d_ff": 32},
        "train": {"epochs": 1},
        "tracking": {"enabled": False},
    })


def test_a_new_run_into_an_earlier_runs_folder_clears_its_outputs_but_keeps_other_files(tmp_path):
    run = tmp_path / "run"
    checkpoint_path(run).parent.mkdir(parents=True)
    checkpoint_path(run).write_bytes(b"earlier run's checkpoint")
    (run / "bundle").mkdir()
    (run / "bundle" / "metadata.json").write_text("{}")
    (run / "eval" / "x-valid").mkdir(parents=True)
    (run / "eval" / "x-valid" / "evaluation.json").write_text("{}")
    (run / "metrics.json").write_text("{}")
    (run / "mlflow_run_id").write_text("abc")
    (run / "notes.txt").write_text("mine")

    with pytest.raises(ConfigError, match="file not found"):  # fails after the run folder is set up, before any training
        run_experiment(_cfg(str(tmp_path / "missing.csv")), run_dir=run)

    assert not checkpoint_path(run).exists()
    for name in ("bundle", "eval", "metrics.json", "mlflow_run_id"):
        assert not (run / name).exists(), name
    assert (run / "notes.txt").read_text() == "mine"
    assert "missing.csv" in (run / "config.yaml").read_text()
