"""Calls grpc ends itself, before the handler runs, leave a log line and a metric.

A request message over ``--max-message-bytes`` is refused by grpc core (the client gets RESOURCE_EXHAUSTED
"Received message larger than max"), after the interceptor looked the handler up and before it ran: the call had no
log line and no metric, and the operator could not tell the server was refusing anything. Now the interceptor notices
the handler was dropped without running: one INFO line with the request id, and
``chatforge_requests_unhandled_total{rpc}``. (Streams refused before any handler lookup leave no trace in the
process; tests/serving/test_server_streams_bound.py checks that, and docs/operations.md says what an operator sees.)
"""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.serving.metrics import ServingMetrics

NO_RETRY = [("grpc.enable_retries", 0)]


class _Unhandled(logging.Handler):
    """Collects the interceptor's "ended before its handler ran" lines; ``seen(n)`` waits for the n-th."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = threading.Condition()

    def emit(self, record):
        if "ended before its handler ran" in record.getMessage():
            with self._changed:
                self.records.append(record)
                self._changed.notify_all()

    def seen(self, n: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.records) >= n, WAIT)


@pytest.fixture
def unhandled_lines():
    handler = _Unhandled()
    logger = logging.getLogger("chatforge.serving.interceptors")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.setLevel(previous)
    logger.removeHandler(handler)


def test_a_message_over_the_size_limit_is_logged_and_counted(unhandled_lines):
    metrics = ServingMetrics(process_metrics=False)
    with ServerThread(make_engine(), metrics=metrics, max_message_bytes=4096) as st, \
            ChatbotClient(st.target, timeout=WAIT, options=NO_RETRY) as client:
        st.wait_serving()
        with pytest.raises(ChatbotError) as err:
            client.classify("x" * 8000, request_id="too-big-1")
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert unhandled_lines.seen(1)
        [line] = unhandled_lines.records
        assert line.levelno == logging.INFO
        assert line.rpc == "/chatforge.v1.Chatbot/Classify" and line.request_id == "too-big-1"
        assert "--max-message-bytes" in line.getMessage()
        assert metrics.value("chatforge_requests_unhandled_total", {"rpc": "Classify"}) == 1
        # It is not a finished request: no status of ours was sent.
        assert metrics.value("chatforge_requests_total", {"rpc": "Classify", "model": "", "status":
                                                          "RESOURCE_EXHAUSTED"}) is None
        # Calls the handler answers are never counted here.
        for _ in range(3):
            assert client.classify("bye").label == "bye"
        with pytest.raises(ChatbotError):
            client.reply("y" * 8000, request_id="too-big-2")
        assert unhandled_lines.seen(2)
        assert [r.request_id for r in unhandled_lines.records] == ["too-big-1", "too-big-2"]
        assert metrics.value("chatforge_requests_unhandled_total", {"rpc": "Classify"}) == 1
        assert metrics.value("chatforge_requests_unhandled_total", {"rpc": "Reply"}) == 1
        assert metrics.value("chatforge_requests_total", {"rpc": "Classify", "model": "intents", "status": "OK"}) == 3
