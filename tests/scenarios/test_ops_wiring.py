"""The operations library wired into the server: one request id across client, API and engine
logs; Jandi alerts with file and line, deduplicated; metrics after known traffic."""

from __future__ import annotations

import inspect
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from tests.serving_fakes import (
    WAIT,
    FailingGenerator,
    FakeClassifier,
    FakeGenerator,
    ServerThread,
    TinySeq2SeqGenerator,
)

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.serving.alerts import AlertManager
from chatforge.serving.engine import Engine
from chatforge.serving.metrics import ServingMetrics
from chatforge.serving.observability import JsonFormatter


class _Lines(logging.Handler):
    """Formats at emit time (in the emitting thread), as a real log handler would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def json_lines():
    handler = _Lines()
    root = logging.getLogger("chatforge")
    old = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def test_one_request_id_in_client_api_and_engine_logs(json_lines):
    engine = Engine({"tiny": TinySeq2SeqGenerator()}, {})
    with ServerThread(engine) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        client.reply("hello", request_id="ops-req-1", max_new_tokens=3)
        assert engine.wait_idle(WAIT)
    mine = [ln for ln in json_lines.lines if ln["request_id"] == "ops-req-1"]
    loggers = {ln["logger"] for ln in mine}
    assert {"chatforge.client.channel", "chatforge.serving.interceptors", "chatforge.serving.batching"} <= loggers
    engine_line = next(ln for ln in mine if ln["logger"] == "chatforge.serving.batching")
    assert engine_line["outcome"] == "completed" and engine_line["completion_tokens"] == 3


class _Receiver:
    """A local webhook receiver recording every POST."""

    def __init__(self) -> None:
        posts = self.posts = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                posts.append((dict(self.headers), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def exception_posts(self):
        return [(h, b) for h, b in self.posts if "RuntimeError" in b["body"]]


def test_engine_exception_alerts_once_with_file_and_line_and_storms_collapse():
    source, start = inspect.getsourcelines(FailingGenerator.stream)
    raise_line = start + next(i for i, ln in enumerate(source) if "raise RuntimeError" in ln)
    with _Receiver() as rx:
        alerts = AlertManager(rx.url, "jandi", server_name="test-host", window_seconds=3600)
        engine = Engine({"bad": FailingGenerator()}, {})
        with ServerThread(engine, alerts=alerts) as st, ChatbotClient(st.target, timeout=WAIT) as client:
            st.wait_serving()
            with pytest.raises(ChatbotError) as err:
                client.reply("hi")
            assert err.value.code == grpc.StatusCode.INTERNAL
            assert alerts.flush(WAIT)
            [(headers, body)] = rx.exception_posts()
            assert headers["Accept"] == "application/vnd.tosslab.jandi-v2+json"
            description = body["connectInfo"][0]["description"]
            assert f"serving_fakes.py:{raise_line}" in description
            assert "rpc: /chatforge.v1.Chatbot/Reply" in description
            for _ in range(50):
                with pytest.raises(ChatbotError):
                    client.reply("hi")
            assert alerts.flush(WAIT)
        alerts.close()
    storm = rx.exception_posts()[1:]
    # critical: the storm's first exception at once, its 49 repeats in one follow-up (flush ended the first window)
    assert len(storm) == 2
    assert "more)" not in storm[0][1]["body"] and "(49 more)" in storm[1][1]["body"]


def test_metrics_after_known_traffic():
    metrics = ServingMetrics(process_metrics=False)
    engine = Engine({"echo": FakeGenerator()}, {"intents": FakeClassifier()})
    with ServerThread(engine, metrics=metrics) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        for _ in range(3):
            assert client.reply("hello there", max_new_tokens=4) == "Hello there!"
        client.classify("bye")
        with pytest.raises(ChatbotError):
            client.reply("")
        assert engine.wait_idle(WAIT)
        client.health()  # lets the server finish its bookkeeping of the calls above

    def v(name, **labels):
        return metrics.value(name, labels) or 0.0

    assert v("chatforge_requests_total", rpc="Reply", model="echo", status="OK") == 3
    assert v("chatforge_requests_total", rpc="Classify", model="intents", status="OK") == 1
    assert v("chatforge_request_failure_total", rpc="Reply", model="echo", reason="validation") == 1
    assert v("chatforge_generation_tokens_total", model="echo") == 12
    assert v("chatforge_prompt_tokens_total", model="echo") == 6
    assert v("chatforge_time_to_first_token_seconds_count", rpc="Reply", model="echo") == 3
    assert v("chatforge_inter_token_latency_seconds_count", model="echo") == 9
    assert v("chatforge_queue_time_seconds_count", model="echo") == 3
    assert v("chatforge_batch_size_count", model="intents") == 1
    assert v("chatforge_requests_running", model="echo") == 0
    assert v("chatforge_requests_waiting", model="echo") == 0
    assert v("chatforge_model_info", model="echo", family="fake", task="generation", version="1") == 1
