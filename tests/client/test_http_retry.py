"""HttpChatClient sends a call again when its connection failed unanswered (a balancer or a draining
server closing a keep-alive connection as the request goes out, a replica killed while writing), as
ChatbotClient does over gRPC: Classify until its whole answer arrived, a Reply only before its first
token; never after an error status, never once a token was yielded."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable

import httpx
import pytest

from chatforge.client import http as http_client
from chatforge.client.http import HttpChatClient, HttpChatError

CALL_ATTEMPTS = http_client.CALL_ATTEMPTS

CLASSIFY_BODY = {"label": "greeting", "score": 0.9, "scores": {"greeting": 0.9}, "out_of_scope": False}


def _sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


STREAM_BODY = _sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
    {"choices": [{"index": 0, "delta": {"content": "hel"}}]},
    {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}},
)


def _response(status: str, body: bytes, content_type: str) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


# What the server does with one request it has read: "drop" closes the connection without a byte,
# bytes are written as they are (then the connection closes), a callable is run first, then a drop.
Action = bytes | str | Callable[[], None]


class _Server(socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(self, actions: Callable[[int], Action]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.actions = actions
        self.requests: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.request.settimeout(5.0)  # a client that never sends must not hang the test
        request_line = self.rfile.readline()
        if not request_line:
            return  # a connection opened and closed without a request (e.g. a closed pool)
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = self.rfile.read(length)
        path = request_line.decode("latin-1").split()[1]
        if path == "/readyz":  # the load test's readiness wait: always ready, not counted
            self.wfile.write(_response("200 OK", b"{}", "application/json"))
            return
        with self.server.lock:
            self.server.requests.append((path, body))
            index = len(self.server.requests) - 1
        action = self.server.actions(index)
        if callable(action):
            action()
        elif isinstance(action, bytes):
            self.wfile.write(action)
            self.wfile.flush()
        # Returning closes the connection: after a full read, a FIN without any response for "drop".


@pytest.fixture
def serve():
    servers: list[tuple[_Server, threading.Thread]] = []

    def start(actions: Callable[[int], Action]) -> _Server:
        server = _Server(actions)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _drop_first(answer: bytes) -> Callable[[int], Action]:
    return lambda i: "drop" if i == 0 else answer


def test_attempts_match_the_grpc_client():
    from chatforge.client import channel

    assert (CALL_ATTEMPTS, http_client.RETRY_BACKOFF_S) == (channel.CALL_ATTEMPTS, channel.RETRY_BACKOFF_S)


def test_classify_is_sent_again_after_a_drop_without_response(serve):
    server = serve(_drop_first(_response("200 OK", json.dumps(CLASSIFY_BODY).encode(), "application/json")))
    with HttpChatClient(server.target, timeout=5.0) as client:
        assert client.classify("hello") == CLASSIFY_BODY
    assert [path for path, _ in server.requests] == ["/v1/classify"] * 2
    assert server.requests[0][1] == server.requests[1][1]  # the same request, sent again


def test_reply_stream_is_sent_again_after_a_drop_without_response(serve):
    server = serve(_drop_first(_response("200 OK", STREAM_BODY, "text/event-stream")))
    with HttpChatClient(server.target, timeout=5.0) as client:
        chunks = list(client.reply_stream("hi"))
    assert [c.text for c in chunks if not c.is_final] == ["hel", "lo"]
    assert chunks[-1].is_final and chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 2
    assert [path for path, _ in server.requests] == ["/v1/chat/completions"] * 2


@pytest.mark.parametrize("rpc", ["classify", "reply"])
def test_the_attempts_of_one_call_carry_one_request_id(serve, rpc):
    """The server's store keeps a call sent again under its X-Request-Id as one turn: without the header every
    attempt got an id of the server's own, and a classification whose answer was lost was stored twice."""
    answer = (_response("200 OK", json.dumps(CLASSIFY_BODY).encode(), "application/json") if rpc == "classify"
              else _response("200 OK", STREAM_BODY, "text/event-stream"))
    server = serve(lambda i: "drop" if i in (0, 2) else answer)
    sent: list[str | None] = []
    with HttpChatClient(server.target, timeout=5.0) as client:
        client._http.event_hooks["request"] = [lambda request: sent.append(request.headers.get("x-request-id"))]
        for _ in range(2):  # two calls, each dropped once
            client.classify("hello") if rpc == "classify" else list(client.reply_stream("hi"))
    assert len(sent) == 4 and sent[0] == sent[1] and sent[2] == sent[3] and sent[0] != sent[2]
    assert all(rid and len(rid) == 32 for rid in sent)


@pytest.mark.parametrize("rpc", ["classify", "reply"])
def test_a_server_that_always_drops_fails_after_call_attempts(serve, rpc):
    server = serve(lambda i: "drop")
    with HttpChatClient(server.target, timeout=5.0) as client, pytest.raises(HttpChatError) as info:
        if rpc == "classify":
            client.classify("hello")
        else:
            list(client.reply_stream("hi"))
    assert len(server.requests) == CALL_ATTEMPTS
    err = info.value
    assert (err.status, err.code, err.status_name) == (503, "unavailable", "HTTP_503")
    assert f"no answer after {CALL_ATTEMPTS} attempts" in err.message
    assert isinstance(err.__cause__, httpx.RemoteProtocolError)  # the original httpx error is kept


def test_an_unreachable_server_fails_as_unavailable(serve):
    server = serve(lambda i: "drop")
    target = server.target
    server.shutdown()
    server.server_close()  # nothing listens on the port any more: connection refused, every attempt
    with HttpChatClient(target, timeout=5.0) as client, pytest.raises(HttpChatError) as info:
        client.classify("hello")
    assert (info.value.status, info.value.code) == (503, "unavailable")
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize("rpc", ["classify", "reply"])
def test_an_http_error_status_is_the_answer_and_is_not_sent_again(serve, rpc):
    error = json.dumps({"error": {"message": "server is draining", "type": "unavailable", "code": "draining"}})
    server = serve(lambda i: _response("503 Service Unavailable", error.encode(), "application/json"))
    with HttpChatClient(server.target, timeout=5.0) as client, pytest.raises(HttpChatError) as info:
        if rpc == "classify":
            client.classify("hello")
        else:
            list(client.reply_stream("hi"))
    assert (info.value.status, info.value.code, info.value.message) == (503, "draining", "server is draining")
    assert len(server.requests) == 1


def test_a_stream_dropped_after_a_token_raises_and_is_not_sent_again(serve):
    # Chunked: the client knows the body is incomplete when the connection closes after one chunk.
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "hel"}}]}\n\n'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = serve(lambda i: head + f"{len(event):x}\r\n".encode() + event + b"\r\n")
    seen = []
    with HttpChatClient(server.target, timeout=5.0) as client, pytest.raises(httpx.RemoteProtocolError):
        for chunk in client.reply_stream("hi"):
            seen.append(chunk)
    assert [c.text for c in seen] == ["hel"]  # the token reached the caller once; the reply is not repeated
    assert len(server.requests) == 1


def _chunked_head(content_type: str) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_classify_cut_after_its_status_is_sent_again(serve):
    # A replica killed between writing the status line and the body (uvicorn writes them separately):
    # the answer never arrived whole, and classifying again is safe.
    whole = _response("200 OK", json.dumps(CLASSIFY_BODY).encode(), "application/json")
    server = serve(lambda i: _chunked_head("application/json") + _chunk(b'{"label": ') if i == 0 else whole)
    with HttpChatClient(server.target, timeout=5.0) as client:
        assert client.classify("hello") == CLASSIFY_BODY
    assert len(server.requests) == 2


def test_a_stream_cut_before_its_first_token_is_sent_again(serve):
    role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
    server = serve(lambda i: _chunked_head("text/event-stream") + _chunk(role) if i == 0
                   else _response("200 OK", STREAM_BODY, "text/event-stream"))
    with HttpChatClient(server.target, timeout=5.0) as client:
        chunks = list(client.reply_stream("hi"))
    assert [c.text for c in chunks if not c.is_final] == ["hel", "lo"]  # once: nothing had reached the caller
    assert len(server.requests) == 2


def test_an_error_status_whose_body_is_cut_is_still_the_answer(serve):
    head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = serve(lambda i: head + _chunk(b'{"error": '))
    with HttpChatClient(server.target, timeout=5.0) as client, pytest.raises(HttpChatError) as info:
        client.classify("hello")
    assert info.value.status == 503 and "cut" in info.value.message
    assert len(server.requests) == 1


def test_no_attempt_after_close(serve):
    holder: dict[str, HttpChatClient] = {}
    closed = threading.Event()

    def close_then_drop() -> None:
        holder["client"].close()  # the caller closes the client while its call is in flight
        closed.set()

    server = serve(lambda i: close_then_drop)
    client = holder["client"] = HttpChatClient(server.target, timeout=5.0)
    with pytest.raises((HttpChatError, httpx.TransportError)):
        client.classify("hello")
    assert closed.wait(5.0)  # the server thread sets it right after close(), which may wake the caller first
    assert len(server.requests) == 1
    with pytest.raises(RuntimeError, match="closed"):  # httpx refuses calls on a closed client
        client.classify("hello")
    assert len(server.requests) == 1


def test_load_test_counts_a_dropping_server_as_http_503(serve):
    from chatforge.client.loadtest import LoadTestConfig, run_load_test

    server = serve(lambda i: "drop")
    report = run_load_test(LoadTestConfig(target=server.target, protocol="http", rpc="classify", requests=2,
                                          texts=["hello"], timeout=5.0))
    assert report.status_counts() == {"HTTP_503": 2}
    assert len(server.requests) == 2 * CALL_ATTEMPTS
