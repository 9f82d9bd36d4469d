"""An over-long session id passed to ``reply_stream(session_id=...)`` (``chatforge chat --session-id``) is refused
naming the field the caller set, not the ``x-session-id`` header the client adds as a copy for proxies."""

from __future__ import annotations

import grpc
import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.context import MAX_SESSION_ID_CHARS


def test_an_over_long_session_id_is_refused_naming_the_field():
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as client:
            with pytest.raises(ChatbotError) as err:
                client.reply("hi", session_id="s" * (MAX_SESSION_ID_CHARS + 1))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details == (f"session_id is {MAX_SESSION_ID_CHARS + 1} characters long; "
                                         f"allowed: at most {MAX_SESSION_ID_CHARS}")
            assert client.reply("hi", session_id="s" * MAX_SESSION_ID_CHARS) == "Hello there!"
