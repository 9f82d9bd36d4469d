"""`chatforge serve` whose stderr nobody reads (a pipe not drained, a terminal paused with Ctrl-S, a container log driver
in blocking mode): it keeps answering, loses no line it held, says on /metrics what waits, and exits on SIGTERM.

Before the log writer thread (``BackgroundLogHandler``) the event loop wrote each line itself: once the pipe's buffer
(64 KiB) was full, about a hundred replies in, every call hung in DEADLINE_EXCEEDED, health checks with them, and
SIGTERM was never handled, so the process did not exit either."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.scenarios.test_e2e import train_tiny_demo, wait_for_file
from tests.scenarios.test_http_e2e import _free_port

from chatforge.client import ChatbotClient

pytestmark = pytest.mark.slow

REPLIES = 300  # ~600 log lines of ~300 bytes: the pipe's 64 KiB fill after about a hundred


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return train_tiny_demo(tmp_path_factory.mktemp("blocked-log") / "run")[0]


def _serve(bundle: Path, tmp_path: Path, metrics_port: int | None = None) -> tuple[subprocess.Popen, str]:
    port_file = tmp_path / "port"
    extra = ["--metrics-port", str(metrics_port)] if metrics_port else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatforge.cli", "serve", "--model", f"chat={bundle}", "--port", "0",
         "--port-file", str(port_file), "--drain-delay", "0", "--grace", "5", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CHATFORGE_ENV": "test", "CHATFORGE_LOG_FORMAT": "json"})
    return proc, f"127.0.0.1:{wait_for_file(port_file, proc)}"


def _reply_many(target: str) -> None:
    with ChatbotClient(target, timeout=10) as client:
        for i in range(REPLIES):
            chunks = list(client.reply_stream(f"안녕하세요 {i}", max_new_tokens=3))
            assert chunks[-1].is_final, f"reply {i} did not end"


def test_a_server_whose_stderr_nobody_reads_keeps_serving_and_loses_no_line(bundle, tmp_path):
    metrics_port = _free_port()
    proc, target = _serve(bundle, tmp_path, metrics_port)
    try:
        _reply_many(target)  # DEADLINE_EXCEEDED about a hundred replies in, before the writer thread
        scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        pending = float(re.search(r"^chatforge_log_pending_records (\S+)$", scrape, re.M).group(1))
        assert pending > 0  # the lines the pipe did not take wait in the server, and /metrics says how many
        assert re.search(r"^chatforge_log_dropped_records_total 0\.0$", scrape, re.M)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]  # someone reads at last: everything held comes out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    calls = [line for line in err.splitlines() if "/chatforge.v1.Chatbot/Reply OK" in line]
    assert len(calls) == REPLIES
    assert "log records dropped" not in err


def test_a_server_whose_stderr_is_never_read_still_exits_on_sigterm(bundle, tmp_path):
    proc, target = _serve(bundle, tmp_path)
    try:
        _reply_many(target)
        proc.send_signal(signal.SIGTERM)
        # Not read at all: the writer stays blocked, the server waits for it a bounded time (LOG_DRAIN_TIMEOUT_S)
        # and exits.
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
