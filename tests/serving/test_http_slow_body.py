"""A request whose body stops arriving gets 408 and its connection is closed.

Request heads have a deadline (408 after 10 s) and idle connections one (60 s), but a body had none: a client that
sent its headers and part of a Content-Length body, then nothing, held its connection, its file descriptor and a
task for good (seen: still open after 75 s), so enough such clients filled the server's connection cap (503 for
everyone) as trickled headers did before the head deadline."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from tests.serving_fakes import WAIT

from chatforge.serving import http as http_module


def _read_all(sock) -> bytes:
    out = b""
    while chunk := sock.recv(4096):  # a socket timeout here fails the test
        out += chunk
    return out


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/classify"])
def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(monkeypatch, served, path):
    monkeypatch.setattr(http_module, "REQUEST_BODY_TIMEOUT_S", 0.3, raising=False)
    st, http = served
    with socket.create_connection(("127.0.0.1", st.server.http.port), timeout=WAIT) as slow:
        slow.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     "x-request-id: slow-body-1\r\ncontent-length: 100\r\n\r\n{\"messages\"".encode())
        # Served meanwhile, on another connection.
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code \
            == 200
        reply = _read_all(slow)
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 "), reply
    assert b"x-request-id: slow-body-1" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "request body not received in time" in error["message"]


def test_a_body_sent_in_pieces_within_the_deadline_is_served(monkeypatch, served):
    monkeypatch.setattr(http_module, "REQUEST_BODY_TIMEOUT_S", 5.0, raising=False)
    st, http = served
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()

    def pieces():
        yield body[:10]
        yield body[10:]

    r = httpx.post(f"http://127.0.0.1:{st.server.http.port}/v1/chat/completions", content=pieces(),
                   headers={"content-type": "application/json"}, timeout=WAIT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello"


@pytest.mark.parametrize(("method", "path"), [("GET", "/healthz"), ("GET", "/v1/models"),
                                              ("OPTIONS", "/v1/chat/completions"), ("GET", "/nope")])
def test_a_body_on_a_get_that_stops_arriving_gets_408_too(monkeypatch, served, method, path):
    """GET, HEAD and OPTIONS skipped the body's deadline (they carry no body, as a rule): a GET with a Content-Length
    was answered at once, and the connection then took the body's bytes for as long as they trickled in, each byte
    resetting the keep-alive timer, so a client held its connection (and a place under the connection cap) for good."""
    monkeypatch.setattr(http_module, "REQUEST_BODY_TIMEOUT_S", 0.3, raising=False)
    st, http = served
    with socket.create_connection(("127.0.0.1", st.server.http.port), timeout=WAIT) as slow:
        slow.sendall(f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\nxx".encode())
        assert http.get("/healthz").status_code == 200  # served meanwhile
        reply = _read_all(slow)  # the server closes the connection (a socket timeout fails the test)
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 "), reply
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_a_get_with_a_whole_small_body_is_served_and_a_large_one_is_413(served):
    st, http = served
    r = http.request("GET", "/v1/models", content=b"{}")
    assert r.status_code == 200 and r.json()["object"] == "list"
    with socket.create_connection(("127.0.0.1", st.server.http.port), timeout=WAIT) as big:
        big.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (64 * 1024 * 1024))
        head, body = _read_all(big).split(b"\r\n\r\n", 1)  # answered without its body, and closed
    assert head.startswith(b"HTTP/1.1 413 ") and json.loads(body)["error"]["code"] == "request_too_large"
