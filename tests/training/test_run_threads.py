"""run_experiment sizes torch's threads from the CPUs the process may use (chatforge.runtime), split
between torchrun's local processes, unless the config sets train.num_threads."""

from __future__ import annotations

import pytest
import torch

from chatforge.config import validate_config
from chatforge.training import run as run_module
from chatforge.training.run import run_experiment


def _tree(tmp_path, **train) -> dict:
    return {
        "name": "threads", "seed": 0,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.0},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "transformer", "task": "classification", "d_model": 16, "n_heads": 2, "d_ff": 32,
                  "num_encoder_layers": 1},
        "train": {"epochs": 1, "max_steps": 1, "batch_size": 8, "max_source_len": 8, **train},
        "output": {"dir": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }


@pytest.mark.parametrize(("local_world", "share"), [(None, 1), ("2", 2)])
def test_threads_come_from_the_available_cpus(tmp_path, monkeypatch, local_world, share):
    calls = []
    monkeypatch.setattr(run_module.runtime, "configure_threads", lambda **kw: calls.append(kw) or 1)
    if local_world:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    run_experiment(validate_config(_tree(tmp_path)), run_dir=tmp_path / "run")
    assert calls == [{"share": share}]


def test_train_num_threads_wins(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(run_module.runtime, "configure_threads", lambda **kw: calls.append(kw) or 1)
    before = torch.get_num_threads()
    try:
        run_experiment(validate_config(_tree(tmp_path, num_threads=1)), run_dir=tmp_path / "run")
        assert calls == [] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
