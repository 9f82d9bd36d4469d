"""The API port bounds each request's head (request line and headers): ``MAX_REQUEST_HEAD_BYTES``, then 431.

uvicorn's httptools protocol had no such bound: ``GET /healthz`` with an ``X-A: aaaa...`` header that never ended
was kept in memory (the parser concatenates each read onto the unfinished line) until the 10 s head timeout, 150 MB
per connection; 16 such connections took the server from 350 MB to 1 GB and slowed other requests 300x.
"""

from __future__ import annotations

import asyncio
import json
import socket

import uvicorn
from tests.serving_fakes import WAIT
from uvicorn.server import ServerState

from chatforge.serving import http as http_module
from chatforge.serving.http import MAX_REQUEST_HEAD_BYTES, GuardedHttpProtocol

HEAD_START = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: "


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a socket timeout here fails the test)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _head(total: int, last: bytes = b"") -> bytes:
    """A whole ``GET /healthz`` head of exactly ``total`` bytes (one header padded), ``last`` its last header."""
    end = b"\r\n" + last + (b"\r\n" if last else b"") + b"\r\n"
    return HEAD_START + b"a" * (total - len(HEAD_START) - len(end)) + end


def test_a_head_that_fills_the_allowance_without_ending_gets_431_at_once(monkeypatch, served):
    """The server answers as soon as it has the allowance's bytes without the head's end, not at the head
    timeout (shortened here, so that waiting for it fails the test quickly with a 408)."""
    monkeypatch.setattr(http_module, "REQUEST_HEAD_TIMEOUT_S", 2.0)
    st, http = served
    with socket.create_connection(("127.0.0.1", st.server.http.port), timeout=WAIT) as sock:
        sock.sendall(HEAD_START + b"a" * (MAX_REQUEST_HEAD_BYTES - len(HEAD_START)))  # the allowance, unfinished
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]  # the API's error object, as for every error
    assert error["code"] == "request_header_fields_too_large"
    assert f"at most {MAX_REQUEST_HEAD_BYTES} bytes" in error["message"]
    assert http.get("/healthz").status_code == 200  # others are served


def test_a_head_of_exactly_the_allowance_is_served_and_the_allowance_is_per_request(served):
    st, http = served
    with socket.create_connection(("127.0.0.1", st.server.http.port), timeout=WAIT) as sock:
        # Two requests on one connection (pipelined in one write): each head fits, together they do not.
        sock.sendall(_head(MAX_REQUEST_HEAD_BYTES) + _head(MAX_REQUEST_HEAD_BYTES, b"Connection: close"))
        reply = _read_all(sock)
    assert reply.count(b"HTTP/1.1 200 OK") == 2, reply[:200]
    # Ordinary requests are unaffected, and so are bodies past the allowance (bounded by --max-message-bytes).
    system = "x" * (3 * MAX_REQUEST_HEAD_BYTES)
    for _ in range(3):  # one keep-alive connection: more head bytes in all than one head may take
        r = http.post("/v1/chat/completions", headers={"x-pad": "p" * (MAX_REQUEST_HEAD_BYTES // 2)},
                      json={"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text


class _Transport(asyncio.Transport):
    """What the protocol writes, and whether it closed the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.written, self.closed = b"", False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _CountingParser:
    """The protocol's httptools parser, counting the bytes it is fed."""

    def __init__(self, parser) -> None:
        self._parser, self.fed = parser, 0

    def feed_data(self, data) -> None:
        self.fed += len(data)
        self._parser.feed_data(data)

    def __getattr__(self, name):
        return getattr(self._parser, name)


def test_a_huge_header_line_read_at_once_is_cut_at_the_allowance_not_buffered():
    """One read holding a 4 MiB header line: the parser is fed the allowance and no more (the old protocol fed it
    all, and went on buffering every later read until the head timeout)."""

    async def main() -> tuple[_Transport, int]:
        config = uvicorn.Config(app=None, http=GuardedHttpProtocol, lifespan="off", log_config=None)
        config.load()
        protocol = GuardedHttpProtocol(config=config, server_state=ServerState(), app_state={},
                                       _loop=asyncio.get_running_loop())
        transport = _Transport()
        protocol.connection_made(transport)
        parser = protocol.parser = _CountingParser(protocol.parser)
        protocol.data_received(HEAD_START + b"a" * (4 << 20))
        if not transport.closed:
            protocol.data_received(b"a" * (4 << 20))
        protocol.connection_lost(None)
        return transport, parser.fed

    transport, fed = asyncio.run(main())
    assert transport.written.startswith(b"HTTP/1.1 431 "), transport.written[:80]
    assert transport.closed and fed <= MAX_REQUEST_HEAD_BYTES, fed
