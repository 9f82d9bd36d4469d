"""The walking skeleton end to end through the real CLI: train -> serve -> health -> chat -> SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatforge.client import ChatbotClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHATFORGE_ENV": "test", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "chatforge.cli", *args], capture_output=True, text=True,
                          env=env, timeout=kw.pop("timeout", 300), **kw)


def train_tiny_demo(run: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """``chatforge train configs/demo.yaml`` into ``run`` at a tiny size (6 steps, d_model 32, 1 + 1 layers): a real
    bundle for tests that serve one; -> (the bundle, the finished command)."""
    r = cli("train", str(REPO / "configs" / "demo.yaml"), "--run-dir", str(run), "--no-progress",
            "--set", "train.epochs=1", "--set", "train.max_steps=6", "--set", "model.d_model=32",
            "--set", "model.d_ff=64", "--set", "model.num_encoder_layers=1", "--set", "model.num_decoder_layers=1")
    assert r.returncode == 0, r.stderr
    return run / "bundle", r


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    bundle, r = train_tiny_demo(tmp_path_factory.mktemp("e2e") / "run")
    assert (bundle / "weights.safetensors").is_file()
    assert "bundle:" in r.stdout
    return bundle


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read()}")
        time.sleep(0.05)  # polling a file the server writes once SERVING; bounded by the deadline
    raise AssertionError("server did not write its port file in time")


def test_train_serve_chat_shutdown(trained, tmp_path):
    from chatforge.runtime import serving_threads

    port_file = tmp_path / "port"
    env = {**os.environ, "CHATFORGE_ENV": "test"}
    env.pop("OMP_NUM_THREADS", None)  # the server sizes its own pool, as in production
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatforge.cli", "serve", "--model", f"chat={trained}", "--port", "0",
         "--port-file", str(port_file), "--grace", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        port = wait_for_file(port_file, proc)
        target = f"127.0.0.1:{port}"
        with ChatbotClient(target, timeout=30) as client:
            assert client.health("") == "SERVING"
            assert client.health("chatforge.v1.Chatbot") == "SERVING"
            chunks = list(client.reply_stream("안녕하세요", max_new_tokens=5))
            final = chunks[-1]
            assert final.finish_reason in ("stop", "length")
            deltas = [c for c in chunks if not c.is_final]
            assert final.completion_tokens == len(deltas) <= 5
            assert final.prompt_tokens > 0
        h = cli("health", target, "--service", "chatforge.v1.Chatbot")
        assert h.returncode == 0 and "SERVING" in h.stdout
        c = cli("chat", target, "-m", "hello", "--max-new-tokens", "4")
        assert c.returncode == 0 and "bot>" in c.stdout, c.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        h = cli("health", target, "--timeout", "1")
        assert h.returncode != 0  # gone
        # torch's pool: the CPUs available less one, left to the event loop, gRPC and the client-facing work
        # (it took every CPU, which on 2 CPUs served a stream at about half the rate)
        threads = [ln for ln in proc.stderr.read().splitlines() if "torch threads: " in ln]
        assert len(threads) == 1 and f"torch threads: {serving_threads({})} (" in threads[0], threads
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_generate_command_answers_locally(trained):
    r = cli("generate", str(trained), "안녕하세요", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "bot:" in r.stdout


def test_serve_refuses_missing_bundle(tmp_path):
    r = cli("serve", "--model", f"chat={tmp_path / 'nope'}", "--port", "0")
    assert r.returncode == 2
    assert "bundle folder not found" in r.stderr
