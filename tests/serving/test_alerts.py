"""AlertManager: payload shapes, exception location, dedupe windows, failing webhooks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chatforge.serving.alerts import AlertManager, jandi_payload


class Receiver:
    """A webhook stand-in on 127.0.0.1 that records requests; ``status`` and ``hold`` shape replies."""

    def __init__(self, status: int = 200):
        self.requests: list[tuple[str, dict[str, str], dict]] = []
        self.status = status
        self.hold: threading.Event | None = None  # when set, replies wait for it (to force client timeouts)
        self.arrived = threading.Semaphore(0)  # released once per request received
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                outer.arrived.release()
                if outer.hold is not None:
                    outer.hold.wait(10)
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook/abc"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def bodies(self) -> list[dict]:
        return [b for _, _, b in self.requests]

    def close(self):
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture()
def clock():
    return FakeClock()


def _manager(url: str, clock: FakeClock, **kw) -> AlertManager:
    kw.setdefault("window_seconds", 60)
    return AlertManager(url, kw.pop("format", "jandi"), server_name="srv-1", clock=clock, **kw)


RAISE_LINE = 0


def _fail(message: str = "kaboom") -> None:
    global RAISE_LINE
    import inspect

    RAISE_LINE = inspect.currentframe().f_lineno + 1
    raise KeyError(message)


def _caught(message: str = "kaboom") -> KeyError:
    try:
        _fail(message)
    except KeyError as e:
        return e
    raise AssertionError("unreachable")


def test_jandi_exception_alert_shape_and_location(receiver, clock):
    with _manager(receiver.url, clock) as m:
        m.alert_exception(_caught(), rpc="Chat", context={"model": "gpt-tiny"})
        assert m.flush(timeout=5)
    ((path, headers, body),) = receiver.requests
    assert path == "/webhook/abc"
    assert headers["Accept"] == "application/vnd.tosslab.jandi-v2+json"
    assert headers["Content-Type"] == "application/json"
    assert set(body) == {"body", "connectColor", "connectInfo"}
    assert "srv-1" in body["body"] and "KeyError" in body["body"]
    assert body["connectColor"].startswith("#")
    (info,) = body["connectInfo"]
    desc = info["description"]
    assert set(info) == {"title", "description"}
    assert "server: srv-1" in desc and "rpc: Chat" in desc and "model: gpt-tiny" in desc
    assert "KeyError: 'kaboom'" in desc
    assert f"{Path(__file__).resolve()}:{RAISE_LINE} in _fail" in desc  # innermost frame, not the caller
    assert "source: raise KeyError(message)" in desc


def test_slack_payload_shape(receiver, clock):
    with _manager(receiver.url, clock, format="slack") as m:
        m.alert_exception(_caught(), rpc="Classify")
    ((_, headers, body),) = receiver.requests
    assert headers["Content-Type"] == "application/json" and "Accept" not in headers
    assert "KeyError in Classify" in body["text"]
    (attachment,) = body["attachments"]
    assert attachment["color"].startswith("#")
    assert any(f":{RAISE_LINE} in _fail" in b["text"]["text"] for b in attachment["blocks"])


def test_fifty_identical_exceptions_the_first_at_once_then_one_post_with_the_count(receiver, clock):
    m = _manager(receiver.url, clock)
    m.alert_exception(_caught(), rpc="Chat")
    assert receiver.arrived.acquire(timeout=10)  # critical: sent without waiting for the window (the clock stands)
    for _ in range(49):
        clock.now += 0.5  # all inside the 60 s window
        m.alert_exception(_caught(), rpc="Chat")
    assert m.poll() == 0  # window still open: the repeats wait
    m.close()
    assert len(receiver.requests) == 2
    first, repeats = receiver.bodies
    assert "(x" not in first["body"] and "more)" not in first["body"]
    assert "(49 more)" in repeats["body"]
    assert "occurrences after the first (already sent): 49 in 24s" in repeats["connectInfo"][0]["description"]
    assert m.sent == 2


def test_a_critical_alert_that_does_not_repeat_is_sent_once(receiver, clock):
    m = _manager(receiver.url, clock)
    m.alert_exception(_caught())
    clock.now += 61
    assert m.poll() == 0  # its follow-up bucket held no repeats: nothing more to say
    m.close()
    assert len(receiver.requests) == 1 and m.sent == 1


def test_warnings_are_still_held_for_the_window_and_sent_once(receiver, clock):
    m = _manager(receiver.url, clock)
    for _ in range(3):
        assert m.check_latency_p99(2.5, 1.0)  # a warning
    clock.now += 30
    assert m.poll() == 0 and receiver.requests == []
    clock.now += 31
    assert m.poll() == 1
    m.close()
    assert len(receiver.requests) == 1 and "(x3)" in receiver.bodies[0]["body"]


def test_window_elapses_then_new_bucket(receiver, clock):
    m = _manager(receiver.url, clock, window_seconds=60)
    for _ in range(3):
        m.alert_exception(_caught())
    clock.now += 30
    assert m.poll() == 0
    clock.now += 31
    assert m.poll() == 1  # the follow-up with the 2 repeats
    assert m.flush(timeout=5)
    m.alert_exception(_caught())  # after the window: a fresh alert, sent at once
    m.close()
    assert [("(2 more)" in b["body"], "more)" in b["body"]) for b in receiver.bodies] == [
        (False, False), (True, True), (False, False)]


def test_different_lines_are_different_alerts(receiver, clock):
    with _manager(receiver.url, clock) as m:
        m.alert_exception(_caught())
        try:
            raise KeyError("other line")
        except KeyError as e:
            m.alert_exception(e)
    assert len(receiver.requests) == 2


def test_zero_window_sends_immediately(receiver, clock):
    with _manager(receiver.url, clock, window_seconds=0) as m:
        m.alert_exception(_caught())
        m.alert_exception(_caught())
        assert m.flush(timeout=5)
    assert len(receiver.requests) == 2


def test_webhook_500_does_not_raise(clock):
    r = Receiver(status=500)
    try:
        m = _manager(r.url, clock)
        m.alert_exception(_caught())
        assert m.flush(timeout=5)
        m.close()
        assert len(r.requests) == 1 and m.failed == 1 and m.sent == 0
    finally:
        r.close()


def test_webhook_timeout_does_not_raise(clock):
    r = Receiver()
    r.hold = threading.Event()
    try:
        m = _manager(r.url, clock, timeout=0.2)
        m.alert_exception(_caught())
        assert m.flush(timeout=5)  # returns once the 0.2 s client timeout fired
        assert m.failed == 1
        m.close()
    finally:
        r.close()


def test_unreachable_webhook_does_not_raise(clock):
    r = Receiver()
    url = r.url
    r.close()  # nothing listens there now
    m = _manager(url, clock, timeout=1)
    m.alert_exception(_caught())
    assert m.flush(timeout=5)
    assert m.failed == 1
    m.close()


def test_full_queue_drops_instead_of_blocking(clock):
    r = Receiver()
    r.hold = threading.Event()
    try:
        m = _manager(r.url, clock, window_seconds=0, queue_size=1, timeout=5)
        for i in range(5):
            try:
                raise ValueError(i)  # one line, but window 0: each is sent on its own
            except ValueError as e:
                m.alert_exception(e)
        assert m.dropped >= 3
        r.hold.set()
        assert m.flush(timeout=10)
        m.close()
    finally:
        r.close()


def test_rule_helpers(receiver, clock):
    with _manager(receiver.url, clock) as m:
        assert m.check_error_rate(errors=1, total=100, threshold=0.05) is False
        assert m.check_error_rate(errors=0, total=0, threshold=0.05) is False
        assert m.check_error_rate(errors=10, total=100, threshold=0.05) is True
        assert m.check_error_rate(errors=20, total=100, threshold=0.05) is True  # same bucket
        assert m.check_latency_p99(0.5, 1.0) is False
        assert m.check_latency_p99(2.5, 1.0) is True
        m.model_load_failed("gpt-tiny", _caught("weights.safetensors missing"))
        m.health_changed("chatforge.v1.Chatbot", "NOT_SERVING")
        m.model_directory_problem("faq", "model 'faq' is pinned to version '9', which does not exist")
        m.watcher_stopped("/models", SystemExit(3))
    titles = sorted(b["connectInfo"][0]["title"] for b in receiver.bodies)
    assert titles == sorted([
        "error rate above threshold", "error rate above threshold", "p99 latency above threshold",
        "model 'gpt-tiny' failed to load",
        "health of chatforge.v1.Chatbot is NOT_SERVING", "model directory: faq cannot be resolved",
        "model directory watcher stopped",
    ])
    pin = next(b for b in receiver.bodies if "cannot be resolved" in b["body"])
    assert "pinned to version '9'" in pin["connectInfo"][0]["description"]
    stop = next(b for b in receiver.bodies if "watcher stopped" in b["body"])
    assert "/models" in stop["connectInfo"][0]["description"] and "SystemExit(3)" in stop["connectInfo"][0]["description"]
    rate = [b for b in receiver.bodies if b["connectInfo"][0]["title"].startswith("error rate")]
    assert ["(1 more)" in b["body"] for b in rate] == [False, True]  # critical: the first at once, then the repeat
    load = next(b for b in receiver.bodies if "failed to load" in b["body"])
    assert "weights.safetensors missing" in load["connectInfo"][0]["description"]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.check_error_rate(1, 10, 5.0), "fraction"),
        (lambda m: m.check_error_rate(11, 10, 0.1), "errors <= total"),
        (lambda m: m.check_latency_p99(1.0, 0), "> 0"),
    ],
)
def test_rule_helpers_reject_bad_input(call, match, clock):
    m = _manager(None, clock)
    with pytest.raises(ValueError, match=match):
        call(m)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="allowed: jandi, slack"):
        AlertManager("http://127.0.0.1:1/x", "teams", server_name="s")
    with pytest.raises(ValueError, match="http:// or https://"):
        AlertManager("ftp://x", server_name="s")


def test_disabled_manager_is_a_no_op(clock):
    m = _manager(None, clock)
    assert not m.enabled
    m.alert_exception(_caught())
    assert m.flush(timeout=1) and m.sent == 0
    m.close()


def test_secrets_in_exception_messages_are_masked(receiver, clock):
    with _manager(receiver.url, clock) as m:
        try:
            raise RuntimeError("upstream rejected Authorization: Bearer sk-abc123")
        except RuntimeError as e:
            m.alert_exception(e)
    assert "sk-abc123" not in json.dumps(receiver.bodies)


def test_jandi_payload_builder_is_pure():
    from chatforge.serving.alerts import Alert

    p = jandi_payload(Alert(key="k", title="t", description="d", severity="warning", count=1), "srv")
    assert p == {"body": "[srv] WARNING: t", "connectColor": "#ECB22E",
                 "connectInfo": [{"title": "t", "description": "d"}]}
