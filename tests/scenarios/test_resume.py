"""Resumable training: SIGKILL mid-epoch, `chatforge train --resume`, same final weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from chatforge.config import validate_config
from chatforge.training.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from chatforge.training.run import run_experiment

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 21  # 646 training examples of the sample corpus / batch 32
PAUSE_AT = 11  # mid-epoch 1, three steps after the checkpoint at step 8


def _tree(tmp_path: Path) -> dict:
    return {
        "name": "resume", "seed": 0,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.0},
        "tokenizer": {"vocab_size": 600},
        "model": {"family": "transformer", "task": "generation", "d_model": 32, "n_heads": 2,
                  "num_encoder_layers": 1, "num_decoder_layers": 1, "d_ff": 64, "dropout": 0.1},
        "train": {"epochs": 2, "batch_size": 32, "num_threads": 1, "device": "cpu", "deterministic": True,
                  "checkpoint_every_steps": 4, "max_target_len": 24, "max_source_len": 24},
        "tracking": {"enabled": False},
        "output": {"dir": str(tmp_path)},
    }


def _env() -> dict[str, str]:
    env = dict(os.environ, CHATFORGE_ENV="test", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


# The victim: trains, and once past PAUSE_AT writes a marker and blocks (as if busy), so the
# kill lands mid-epoch at a known step, after a checkpoint and with un-checkpointed work to lose.
VICTIM = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    from chatforge.config import load_config
    from chatforge.training.run import run_experiment
    from chatforge.training.trainer import Callback

    class Pause(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == {pause}:
                Path(sys.argv[3]).write_text(str(trainer.batches_done))
                threading.Event().wait()

    run_experiment(load_config(sys.argv[1]), run_dir=sys.argv[2], callbacks=[Pause()])
""")


def _wait_for(paths: list[Path], proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {paths}")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path):
    tree = _tree(tmp_path)
    cfg_file = tmp_path / "resume.yaml"
    cfg_file.write_text(yaml.safe_dump(tree), encoding="utf-8")

    ref = run_experiment(validate_config(tree), run_dir=tmp_path / "ref")

    run_dir, marker = tmp_path / "killed", tmp_path / "paused"
    script = tmp_path / "victim.py"
    script.write_text(VICTIM.replace("{pause}", str(PAUSE_AT)), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script), str(cfg_file), str(run_dir), str(marker)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for([checkpoint_path(run_dir), marker], proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert int(marker.read_text()) == PAUSE_AT < STEPS_PER_EPOCH  # killed mid-epoch
    assert not (run_dir / "bundle").exists()
    saved = load_checkpoint(checkpoint_path(run_dir))["position"]
    assert (saved["epoch"], saved["step"], saved["batches_done"]) == (1, 8, 8)

    out = subprocess.run([sys.executable, "-m", "chatforge.cli", "train", "--resume", str(run_dir),
                          "--no-progress"], env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    a = load_file(ref.bundle_dir / "weights.safetensors")
    b = load_file(run_dir / "bundle" / "weights.safetensors")
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diffs, f"weights differ after resume: {diffs}"
    import json

    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["steps"] == ref.metrics["steps"] == 2 * STEPS_PER_EPOCH
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in ref.metrics["history"]]


def test_resume_cli_errors_are_clear(tmp_path):
    env = _env()
    out = subprocess.run([sys.executable, "-m", "chatforge.cli", "train", "--resume", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a run folder" in out.stderr
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_tree(tmp_path)), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "chatforge.cli", "train", "--resume", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "checkpoint_every_steps" in out.stderr


def test_checkpoint_file_round_trip_and_rejects_garbage(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "opt": {0: {"step": torch.tensor(3.0)}},
             "betas": (0.9, 0.98), "best": None, "loss": float("inf"), "name": "x"}
    path = save_checkpoint(tmp_path / "c.safetensors", state)
    back = load_checkpoint(path)
    assert torch.equal(back["w"], state["w"]) and back["opt"][0]["step"].item() == 3.0
    assert back["betas"] == (0.9, 0.98) and back["best"] is None and back["loss"] == float("inf")
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="cannot store object"):
        save_checkpoint(tmp_path / "d.safetensors", {"x": object()})
