"""Closing the alert manager takes at most its timeout in all, also when the webhook hangs: close() flushed for its
timeout, then waited as long again for its worker to post every queued alert (3 s each against a webhook that never
answers), so a replica whose webhook endpoint hung overran its shutdown grace period (Kubernetes: SIGKILL)."""

from __future__ import annotations

import socket
import time

import pytest

from chatforge.serving.alerts import AlertManager


@pytest.fixture
def hanging_webhook():
    """A port that accepts connections (the listen backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/hook"


def test_close_returns_within_its_timeout_and_counts_what_was_not_sent(hanging_webhook):
    manager = AlertManager(hanging_webhook, "slack", server_name="srv", window_seconds=0, timeout=3.0)
    for i in range(20):
        manager.alert(f"alert {i}", "the webhook hangs")
    start = time.monotonic()
    manager.close(timeout=2.0)
    elapsed = time.monotonic() - start
    assert elapsed < 3.0, f"close(timeout=2.0) took {elapsed:.1f} s"
    # every alert is accounted for: none sent, a POST that timed out failed, the rest were dropped at close (but
    # the one POST the worker may still be waiting on when close returns)
    assert manager.sent == 0
    assert 19 <= manager.failed + manager.dropped <= 20
    assert manager.dropped >= 18
