"""Ctrl-C during `chatforge train`: the message offers `--resume` only when the run folder holds a checkpoint.

Before, it always said "the last checkpoint is in RUN: continue with chatforge train --resume RUN", and without
train.checkpoint_every_steps (no shipped config sets it) that resume failed with "no checkpoint"."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import chatforge.training.run as run_mod
from chatforge.cli import app
from chatforge.training.checkpoint import checkpoint_path

CONFIG = """name: tiny
data: {path: sample}
model: {family: linear, task: classification}
tracking: {enabled: false}
"""


@pytest.fixture
def interrupted(monkeypatch, tmp_path):
    def fake_run(cfg, *, callbacks=None, run_dir=None, **kw):
        if (tmp_path / "with-ckpt") == run_dir:
            checkpoint_path(run_dir).parent.mkdir(parents=True)
            checkpoint_path(run_dir).write_bytes(b"ckpt")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "run_experiment", fake_run)
    (tmp_path / "c.yaml").write_text(CONFIG)
    return tmp_path


def test_no_checkpoint_no_resume_offer(interrupted):
    run = interrupted / "no-ckpt"
    r = CliRunner().invoke(app, ["train", str(interrupted / "c.yaml"), "--run-dir", str(run), "--no-progress"])
    assert r.exit_code == 130
    assert "--resume" not in r.output and "no checkpoint" in r.output
    assert "checkpoint_every_steps" in r.output


def test_checkpoint_offers_resume(interrupted):
    run = interrupted / "with-ckpt"
    r = CliRunner().invoke(app, ["train", str(interrupted / "c.yaml"), "--run-dir", str(run), "--no-progress"])
    assert r.exit_code == 130
    assert f"chatforge train --resume {run}" in r.output.replace("\n", "")
