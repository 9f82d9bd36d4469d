"""HttpChatClient.reply_stream takes a 200 for a reply only when it is a whole chat completion stream: SSE
``data:`` chunks ending with ``data: [DONE]``. A listener answering ``200 hello`` (or a stream cut short on a
connection that just closes) was a normal reply with finish_reason None, and ``loadtest --protocol http``
counted it OK."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from chatforge.client.http import HttpChatClient, HttpChatError

ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
TOKEN = {"choices": [{"index": 0, "delta": {"content": "hel"}}]}
LAST = {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}}


def _events(*payloads: dict | str) -> bytes:
    return b"".join(b"data: " + (p if isinstance(p, str) else json.dumps(p)).encode() + b"\n\n" for p in payloads)


def _answer(body: bytes, content_type: str = "text/event-stream") -> bytes:
    """A 200 with a Content-Length: the body arrives whole, so only the client's own checks can fault it."""
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5.0)  # a client that never sends must not hang the test
        if not self.rfile.readline():
            return
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        self.rfile.read(length)
        self.wfile.write(self.server.answer)  # type: ignore[attr-defined]


@contextmanager
def _listener(answer: bytes) -> Iterator[str]:
    """A server answering every request (the readiness probe too) with ``answer``; yields HOST:PORT."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.answer = answer  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_whole_stream_is_a_reply():
    with _listener(_answer(_events(ROLE, TOKEN, LAST, USAGE, "[DONE]"))) as target, \
            HttpChatClient(target, timeout=5.0) as client:
        chunks = list(client.reply_stream("hi"))
    assert [c.text for c in chunks if not c.is_final] == ["hel", "lo"]
    assert chunks[-1].is_final and chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 2


@pytest.mark.parametrize("answer, expected", [
    (_answer(b"hello", "text/plain"), "without a chat completion stream"),  # not SSE at all
    (_answer(_events("[DONE]")), "without a chat completion stream"),  # no chunk before the end
], ids=["not-sse", "done-only"])
def test_a_200_that_is_no_chat_stream_is_an_error(answer, expected):
    with _listener(answer) as target, HttpChatClient(target, timeout=5.0) as client:
        with pytest.raises(HttpChatError) as info:
            list(client.reply_stream("hi"))
    assert expected in info.value.message and "HTTP port" in info.value.message
    assert info.value.code == "not_a_chat_stream" and info.value.status_name == "BAD_STREAM"


def test_a_stream_that_ends_before_done_is_an_error_after_its_tokens():
    seen = []
    with _listener(_answer(_events(ROLE, TOKEN))) as target, HttpChatClient(target, timeout=5.0) as client:
        with pytest.raises(HttpChatError) as info:
            for chunk in client.reply_stream("hi"):
                seen.append(chunk)
    assert [c.text for c in seen] == ["hel"]  # no final chunk: the reply is not whole
    assert info.value.code == "incomplete_stream" and "without data: [DONE]" in info.value.message
    assert info.value.status_name == "BAD_STREAM"


def test_an_event_that_is_not_json_is_an_error():
    with _listener(_answer(b"data: <html>\n\n")) as target, HttpChatClient(target, timeout=5.0) as client:
        with pytest.raises(HttpChatError) as info:  # was a bare JSONDecodeError (a CLIENT_ERROR and a traceback)
            list(client.reply_stream("hi"))
    assert "not a JSON object" in info.value.message and "'<html>'" in info.value.message


def test_loadtest_counts_a_200_hello_listener_as_errors(tmp_path):
    from chatforge.cli import app

    with _listener(_answer(b"hello", "text/plain")) as target:
        r = CliRunner().invoke(app, ["loadtest", target, "--protocol", "http", "--requests", "3",
                                     "--out", str(tmp_path)])
    assert r.exit_code == 1 and "no request succeeded (3 errors" in r.output, r.output  # was 0
    data = json.loads((tmp_path / "report.json").read_text())  # the report is still written
    assert (data["ok"], data["errors"]) == (0, 3)  # was ok 3 (ok 2 / errors 1 in the report that found it)
    assert data["status_codes"] == {"BAD_STREAM": 3}
    assert "without a chat completion stream" in next(iter(data["error_messages"]))


@pytest.mark.parametrize("event", [
    {"choices": {"0": {"delta": {"content": "x"}}}},  # choices not a list
    {"choices": ["x"]},  # a choice not an object
    {"choices": [{"delta": "x"}]},  # a delta not an object
    {"choices": [{"delta": {"content": 5}}]},  # content not text
    {"choices": [], "usage": 5},  # usage not an object
], ids=["choices-dict", "choice-str", "delta-str", "content-int", "usage-int"])
def test_an_event_of_the_wrong_shape_is_a_bad_stream(event):
    """A JSON object whose fields have the wrong types (a proxy's or another server's stream) raised AttributeError or
    TypeError out of reply_stream: a load test counted it as a client error with a traceback, not a bad stream."""
    with _listener(_answer(_events(ROLE, event, LAST, "[DONE]"))) as target, \
            HttpChatClient(target, timeout=5.0) as client:
        with pytest.raises(HttpChatError) as info:
            list(client.reply_stream("hi"))
    assert info.value.code == "not_a_chat_stream" and info.value.status_name == "BAD_STREAM"
    assert "not a chat completion chunk" in info.value.message


def _error_answer(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


@pytest.mark.parametrize(("body", "message"), [
    (b'"Bad Gateway"', '"Bad Gateway"'),  # a JSON string
    (b"[1, 2]", "[1, 2]"),  # a JSON array
    (b'{"error": "upstream timed out"}', "upstream timed out"),  # error as text, not an object
    (b'{"error": {"message": 5, "code": 7}}', "5"),
], ids=["json-string", "json-array", "error-text", "error-fields-not-text"])
@pytest.mark.parametrize("rpc", ["reply_stream", "classify"])
def test_an_error_body_of_another_shape_is_still_the_servers_error(body, message, rpc):
    """A proxy in front of the server (or another server) answering 502 with a body that is JSON but not the OpenAI
    error object raised AttributeError ('str' object has no attribute 'get'), not HttpChatError with its status."""
    with _listener(_error_answer("502 Bad Gateway", body)) as target, HttpChatClient(target, timeout=5.0) as client:
        with pytest.raises(HttpChatError) as info:
            call = getattr(client, rpc)("hi")
            if rpc == "reply_stream":
                list(call)
    assert info.value.status == 502 and info.value.status_name == "HTTP_502"
    assert message in info.value.message
    assert info.value.code is None or isinstance(info.value.code, str)
