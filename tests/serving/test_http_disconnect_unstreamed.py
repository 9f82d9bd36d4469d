"""A client that gives up on a non-streamed completion (an SDK's timeout, a closed tab) frees its slot.

Only streamed replies watched for the client's disconnect: a non-streamed one kept generating to its
max_tokens for nobody, holding a running slot (and the openai client's retries after its timeout piled
more such orphans onto the same server)."""

from __future__ import annotations

import logging
import threading

import httpx
from tests.serving.conftest import assert_abandoned_then_freed, post_chat_raw
from tests.serving_fakes import WAIT, FakeGenerator, GatedGenerator, ServerThread

from chatforge.serving.engine import Engine


def test_a_client_gone_before_its_non_streamed_reply_frees_the_slot(caplog):
    caplog.set_level(logging.INFO)
    gate = threading.Semaphore(0)
    gen = GatedGenerator(gate=gate)
    engine = Engine({"gated": gen}, {}, max_running=2)
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        with post_chat_raw(st.server.http.port, b'{"messages":[{"role":"user","content":"a"}],"max_tokens":500}'):
            assert engine.stats.wait_for(lambda s: s.running == 1, WAIT), "the request never started"
        # The connection is closed: the server must notice and abandon the reply, as it does for a stream.
        assert_abandoned_then_freed(engine, gen, gate, releases=600)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a client's disconnect logged an error"
    assert [r.http_status for r in caplog.records if getattr(r, "rpc", None) == "/v1/chat/completions"] == [499]


def test_a_non_streamed_reply_whose_client_waits_is_whole_and_logged_once(caplog):
    caplog.set_level(logging.INFO)
    with ServerThread(Engine({"echo": FakeGenerator()}, {}), http_port=0) as st:
        st.wait_serving()
        r = httpx.post(f"http://127.0.0.1:{st.server.http.port}/v1/chat/completions", timeout=WAIT,
                       json={"messages": [{"role": "user", "content": "a"}]}, headers={"x-request-timeout": "5"})
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "Hello there!"
        assert r.json()["usage"]["completion_tokens"] == 4
    assert [r.http_status for r in caplog.records if getattr(r, "rpc", None) == "/v1/chat/completions"] == [200]
