"""The metrics port (/metrics, /healthz, /readyz) under slow and odd clients: a deadline for the whole request
head, probe slots beyond the connection cap, a listen backlog for bursts of probes, 405 for every other method."""

from __future__ import annotations

import select
import socket
import time

import httpx
import pytest

from chatforge.serving import metrics as metrics_module
from chatforge.serving.metrics import MetricsHTTPServer, ServingMetrics

WAIT = 10.0  # upper bound of every wait here (never reached when things work)
BUSY_REPLY_END = b"too many connections\n"


def _server() -> MetricsHTTPServer:
    return MetricsHTTPServer(ServingMetrics(process_metrics=False), "127.0.0.1", 0)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a socket timeout here fails the test)."""
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


def test_a_request_head_trickled_a_line_at_a_time_is_cut_at_its_deadline(monkeypatch):
    """The read timeout applied to each read: a client sending one header line before each read timed out held
    its connection (and thread, and place under the cap) for as long as it liked. The head has one deadline now."""
    monkeypatch.setattr(metrics_module, "REQUEST_READ_TIMEOUT_S", 0.3)
    with _server() as server, socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        started, closed = time.monotonic(), False
        # A header line every 0.1 s (three per read timeout), until the server closes the connection or 3 s pass
        # (30 lines: under http.server's limit of 100 header lines, which would end it with a 431).
        while not closed and time.monotonic() - started < 3.0:
            readable, _, _ = select.select([slow], [], [], 0.1)
            try:
                if readable:
                    assert slow.recv(4096) == b""  # closed, no answer: the request never arrived whole
                    closed = True
                else:
                    slow.sendall(b"X-Slow: 1\r\n")
            except (ConnectionResetError, BrokenPipeError):  # closed with our unread header lines in its buffer
                closed = True
        took = time.monotonic() - started
    assert closed, "the server kept reading a request head trickled a line at a time"
    assert took < 2.0, took  # the deadline is 0.3 s


def test_probes_are_answered_while_slow_clients_hold_every_slot(monkeypatch):
    """70 slow clients against a cap of 64 kept /healthz at 503 "too many connections": a liveness probe failed
    and Kubernetes would restart the pod. A few reserved slots beyond the cap serve /healthz and /readyz only."""
    monkeypatch.setattr(metrics_module, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(metrics_module, "PROBE_HEAD_TIMEOUT_S", 0.2, raising=False)
    with _server() as server:
        addr = ("127.0.0.1", server.port)
        held = [socket.create_connection(addr, timeout=WAIT) for _ in range(2)]
        try:
            for s in held:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a head: each holds a slot
            url = f"http://127.0.0.1:{server.port}"
            assert httpx.get(url + "/healthz", timeout=WAIT).status_code == 200  # was 503
            assert httpx.get(url + "/readyz", timeout=WAIT).status_code == 200
            scrape = httpx.get(url + "/metrics", timeout=WAIT)  # a probe slot is for probes
            assert scrape.status_code == 503 and scrape.content == BUSY_REPLY_END
            # A connection that sends nothing gets the answer for one over the cap (once its probe slot's short
            # deadline passed, or at once when the probe slots are taken too).
            with socket.create_connection(addr, timeout=WAIT) as silent:
                reply = _read_all(silent)
            assert reply.startswith(b"HTTP/1.1 503 ") and reply.endswith(BUSY_REPLY_END)
        finally:
            for s in held:
                s.close()


def test_the_listen_backlog_holds_a_burst_of_connections():
    """socketserver's backlog of 5: of 30 concurrent /healthz with a 1 s timeout, 4 timed out (their SYNs were
    dropped while the accept queue was full and sent again a second later)."""
    server = metrics_module._MirrorHTTPServer(("127.0.0.1", 0), ServingMetrics(process_metrics=False), lambda: True)
    try:
        assert server.request_queue_size >= metrics_module.MAX_CONNECTIONS
        # Nothing accepts: every connection below waits in the accept queue, which must hold them all.
        burst = []
        try:
            for _ in range(metrics_module.MAX_CONNECTIONS):
                burst.append(socket.create_connection(server.server_address, timeout=2.0))
        finally:
            for s in burst:
                s.close()
        assert len(burst) == metrics_module.MAX_CONNECTIONS
    finally:
        server.server_close()


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "BREW", "GETX"])
def test_every_method_but_get_and_head_is_405(method):
    """http.server answered methods without a do_<METHOD> with its 501 HTML page."""
    with _server() as server, socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.sendall(f"{method} /metrics HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reply = _read_all(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 405 "), reply
    assert b"\r\nAllow: GET, HEAD" in head
    assert body == f"{method} is not allowed here; allowed: GET, HEAD\n".encode()


def test_a_method_that_is_no_word_is_not_echoed():
    with _server() as server, socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.sendall(b"<script> /metrics HTTP/1.1\r\n\r\n")
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.0 405 ") and reply.endswith(b"this method is not allowed here; allowed: GET, HEAD\n")
