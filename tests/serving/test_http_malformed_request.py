"""Bytes the HTTP parser refuses get the API's error object, as every other error of the port.

uvicorn answers them with its own ``text/plain`` "Invalid HTTP request received.", while the other refusals the
protocol layer makes (408, 431, 503) carry the OpenAI error object (README: "Errors use the OpenAI error object")."""

from __future__ import annotations

import json
import socket

import pytest
from tests.serving_fakes import WAIT


def _exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(raw)
        out = b""
        while chunk := sock.recv(4096):  # a socket timeout here fails the test
            out += chunk
    return out


@pytest.mark.parametrize("raw", [
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: abc\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n{}",
    b"GARBAGE\r\n\r\n",
])
def test_a_request_the_parser_refuses_gets_400_with_the_error_object_and_is_closed(served, raw):
    st, http = served
    reply = _exchange(st.server.http.port, raw)
    head, body = reply.split(b"\r\n\r\n", 1)
    lines = head.lower().split(b"\r\n")
    assert lines[0].startswith(b"http/1.1 400 "), reply
    assert b"content-type: application/json" in lines and b"connection: close" in lines
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_http_request")
    assert "HTTP" in error["message"]
    assert http.get("/healthz").status_code == 200  # the port serves on
