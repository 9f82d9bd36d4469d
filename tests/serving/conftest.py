"""What the serving tests share: a server with the HTTP API on and its base URL, and a logger of their own."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine


@pytest.fixture()
def isolated_logger(request):
    """A logger named after the test module that hands nothing to the root logger (so no line reaches pytest's
    capture or a production sink), with every handler a test adds removed and closed afterwards."""
    lg = logging.getLogger(f"chatforge.tests.{request.module.__name__.rsplit('.', 1)[-1]}")
    lg.propagate = False
    yield lg
    for h in list(lg.handlers):
        lg.removeHandler(h)
        h.close()
    lg.propagate = True
    lg.setLevel(logging.NOTSET)


def base_url(st: ServerThread) -> str:
    return f"http://127.0.0.1:{st.server.http.port}"


@pytest.fixture
def served():
    """A ``ServerThread`` over the fake engine with the HTTP API on a free port, and an httpx client for it."""
    with ServerThread(make_engine(), http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            yield st, http


def post_chat_raw(port: int, body: bytes) -> socket.socket:
    """``body`` POSTed to /v1/chat/completions over a plain socket, left open: the test closes it (a client that
    leaves) or reads the reply from it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def assert_abandoned_then_freed(engine, gen, gate, releases: int = 100) -> None:
    """After a client went away mid-reply: the engine notices (the request is abandoned by its consumer), and the
    batcher drops the sequence at its next step (at most one more step), freeing the slot. ``gen`` is the
    GatedGenerator the reply runs on and ``gate`` its semaphore; the gate is opened for the steps left after."""
    assert engine.stats.wait_for(lambda s: s.abandoned == 1, WAIT), "the disconnect was not noticed"
    steps = gen.step_model.step_calls
    gate.release()
    assert engine.stats.wait_for(lambda s: s.running == 0, WAIT), "the slot was not freed"
    assert engine.dropped == 1
    assert gen.step_model.step_calls - steps <= 1
    for _ in range(releases):
        gate.release()
