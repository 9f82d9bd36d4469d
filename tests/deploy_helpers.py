"""Shared by the deployment tests (image, HAProxy failover, extras split): tiny real bundles, free
ports, bounded waits on HTTP and gRPC health, and `chatforge serve` subprocesses.

Imported as a plain module like serving_fakes. Everything is bounded by a timeout; nothing sleeps in
place of a condition (waits poll the condition they name).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHATFORGE = [sys.executable, "-m", "chatforge.cli"]
TRAIN_ONLY_MODULES = ("mlflow", "optuna", "sklearn", "scipy", "xgboost", "matplotlib", "sacrebleu", "alembic",
                      "faiss")  # chatforge[train]'s, its estimators extra's included
ESTIMATOR_MODULES = ("sklearn", "scipy", "xgboost", "faiss")  # chatforge[estimators]


def train_tiny_bundles(root: Path) -> tuple[Path, Path]:
    """A generation bundle and a classification bundle trained in seconds on the shipped sample
    corpus (both Transformers: what the serving image serves without the training extra)."""
    from chatforge.config import validate_config
    from chatforge.training.run import run_experiment

    out = []
    for task in ("generation", "classification"):
        model = {"family": "transformer", "task": task, "d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0,
                 "num_encoder_layers": 1}
        if task == "generation":
            model["num_decoder_layers"] = 1
        tree = {
            "name": f"deploy-{task}",
            "seed": 0,
            "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.0},
            "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
            "model": model,
            "train": {"epochs": 1, "max_steps": 4, "batch_size": 16, "lr": 1e-3, "max_source_len": 24,
                      "max_target_len": 24},
            "output": {"dir": str(root / "runs")},
            "tracking": {"enabled": False},
        }
        out.append(run_experiment(validate_config(tree), run_dir=root / f"run-{task}").bundle_dir)
    return out[0], out[1]


def train_tiny_selector(root: Path, **model) -> Path:
    """A response-selection bundle trained in seconds on the shipped sample corpus (TF-IDF by default; ``model`` keys
    override, e.g. ``encoder="ranker", ranker_trees=10``): what the hybrid reply policy retrieves from."""
    from chatforge.config import validate_config
    from chatforge.training.run import run_experiment

    tree = {
        "name": "tiny-selector", "seed": 0,
        "data": {"path": "sample", "format": "chatbot_csv", "valid_fraction": 0.1, "test_fraction": 0.1},
        "model": {"family": "retrieval", "task": "selection", "encoder": "tfidf", "neighbours": 5, **model},
        "output": {"dir": str(root / "runs")},
        "tracking": {"enabled": False},
    }
    return run_experiment(validate_config(tree), run_dir=root / "run-selector").bundle_dir


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``cond`` until true; return the seconds it took, or raise naming ``what``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return 0, ""


def ready(url: str) -> bool:
    return http_get(url, timeout=1.0)[0] == 200


class Replica:
    """One `chatforge serve` subprocess (optionally inside a network namespace) with both bundles."""

    def __init__(self, chat: Path, intent: Path, host: str, port: int, metrics_port: int, log: Path,
                 netns: str | None = None, grace: float = 5.0, drain_delay: float | None = None,
                 http_port: int | None = None):
        self.chat, self.intent, self.host, self.port, self.metrics_port = chat, intent, host, port, metrics_port
        self.log, self.netns, self.grace, self.drain_delay = log, netns, grace, drain_delay
        self.http_port = http_port  # also serve the HTTP API (--http-port) when set
        self.proc: subprocess.Popen | None = None

    @property
    def readyz(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/readyz"

    def start(self) -> Replica:
        cmd = [*CHATFORGE, "serve", "--model", f"chat={self.chat}", "--model", f"intent={self.intent}",
               "--host", self.host, "--port", str(self.port), "--metrics-port", str(self.metrics_port),
               "--grace", str(self.grace)]
        if self.drain_delay is not None:
            cmd += ["--drain-delay", str(self.drain_delay)]
        if self.http_port is not None:
            cmd += ["--http-port", str(self.http_port)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = {**os.environ, "CHATFORGE_ENV": "test", "CHATFORGE_LOG_FORMAT": "human", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        # ip netns exec keeps the pid (it execs), so signals reach chatforge itself.
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def say(pytestconfig, text: str) -> None:
    """Print past pytest's capture, so figures reach the CI log whether the test passes or fails."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        print(text, flush=True)
