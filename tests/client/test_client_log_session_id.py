"""The client's log lines for a Reply carry the call's session id, as the server's access line and the engine's
lines do: one ``grep`` for a conversation finds the client's side of it too (it found only the server's)."""

from __future__ import annotations

import logging

import grpc
import pytest
from tests.serving_fakes import (
    WAIT,
    FailingGenerator,
    FakeGenerator,
    ServerThread,
    json_log_lines,
    make_engine,
)

from chatforge.client import ChatbotClient, ChatbotError


@pytest.fixture
def json_lines():
    with json_log_lines(logging.DEBUG) as lines:
        yield lines


def test_every_line_of_a_reply_names_its_session_on_both_sides(json_lines):
    engine = make_engine(generators={"echo": FakeGenerator(), "fail": FailingGenerator(name="fail")})
    with ServerThread(engine) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as client:
            client.reply("hi", session_id="conv-7", request_id="req-ok-1")
            with pytest.raises(ChatbotError) as err:
                client.reply("hi", model="fail", session_id="conv-7", request_id="req-fail-1")
            assert err.value.code == grpc.StatusCode.INTERNAL
    for rid in ("req-ok-1", "req-fail-1"):
        lines = [d for d in json_lines() if d["request_id"] == rid]
        loggers = {d["logger"] for d in lines}
        # the client's, the server's access line and the engine's
        assert {"chatforge.client.channel", "chatforge.serving.interceptors", "chatforge.serving.batching"} <= loggers
        assert [d["logger"] for d in lines if d["session_id"] != "conv-7"] == []
