"""A streamed request whose client leaves while it is still queued (before its first token) frees its place.

The SSE response watched for the client's disconnect only once its first token had come: before that, the handler
waited on the engine with nobody listening to the connection, so a client that gave up on a saturated server left a
request in the queue that later ran to its max_tokens for nobody, holding a batch slot."""

from __future__ import annotations

import logging
import threading

from tests.serving.conftest import post_chat_raw
from tests.serving_fakes import WAIT, GatedGenerator, ServerThread

from chatforge.serving.engine import Engine

# The old code notices only once the running request ends, which the test holds back for longer than this.
NOTICE_S = WAIT / 2

LONG = b'{"messages":[{"role":"user","content":"a"}],"max_tokens":500}'
LONG_STREAMED = b'{"messages":[{"role":"user","content":"b"}],"max_tokens":500,"stream":true}'


def test_a_streamed_request_whose_client_leaves_while_queued_is_withdrawn(caplog):
    caplog.set_level(logging.INFO)
    gate = threading.Semaphore(0)
    gen = GatedGenerator(gate=gate)
    engine = Engine({"gated": gen}, {}, max_running=1)
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        port = st.server.http.port
        running = post_chat_raw(port, LONG)
        try:
            assert engine.stats.wait_for(lambda s: s.running == 1, WAIT), "the first request never started"
            with post_chat_raw(port, LONG_STREAMED):
                assert engine.stats.wait_for(lambda s: s.waiting == 1, WAIT), "the streamed request was not queued"
            # Closed while queued, the running request still holding the only slot: withdrawn now, not later.
            assert engine.stats.wait_for(lambda s: s.abandoned == 1 and s.waiting == 0 and s.dropped == 1,
                                         NOTICE_S), "the queued stream's disconnect was not noticed"
            assert engine.stats.running == 1 and gen.step_model.step_calls == 0
        finally:
            running.close()
        # The running (non-streamed) request's client is gone too: it is dropped at its next step.
        assert engine.stats.wait_for(lambda s: s.abandoned == 2, WAIT)
        steps = gen.step_model.step_calls
        gate.release()
        assert engine.stats.wait_for(lambda s: s.running == 0 and s.dropped == 2, WAIT), "the slot was not freed"
        assert gen.step_model.step_calls - steps <= 1
        for _ in range(600):
            gate.release()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a client's disconnect logged an error"
    assert sorted(r.http_status for r in caplog.records if getattr(r, "rpc", None) == "/v1/chat/completions") \
        == [499, 499]


def test_a_streamed_request_queued_then_run_still_streams_whole():
    """The watcher that looks for a disconnect while queued hands the connection over intact: the stream goes on
    once a slot frees, and its own disconnect (mid-reply) is still noticed."""
    gate = threading.Semaphore(0)
    gen = GatedGenerator(gate=gate)
    engine = Engine({"gated": gen}, {}, max_running=1)
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        port = st.server.http.port
        first = post_chat_raw(port, LONG)
        assert engine.stats.wait_for(lambda s: s.running == 1, WAIT)
        with post_chat_raw(port, LONG_STREAMED) as sock:
            assert engine.stats.wait_for(lambda s: s.waiting == 1, WAIT)
            first.close()  # the slot frees at the running request's next step
            assert engine.stats.wait_for(lambda s: s.abandoned == 1, WAIT)
            gate.release()
            assert engine.stats.wait_for(lambda s: s.running == 1 and s.waiting == 0, WAIT)
            got = b""
            while b"data: " not in got or b'"content":"<' not in got:  # the streamed reply's first token
                chunk = sock.recv(65536)
                assert chunk, f"the connection closed before the first token: {got!r}"
                got += chunk
            assert got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got
        # closed mid-reply: noticed by the SSE response's own watcher, dropped at the next step
        assert engine.stats.wait_for(lambda s: s.abandoned == 2, WAIT), "the disconnect mid-reply was not noticed"
        gate.release()
        assert engine.stats.wait_for(lambda s: s.running == 0 and s.dropped == 2, WAIT), "the slot was not freed"
        for _ in range(600):
            gate.release()
