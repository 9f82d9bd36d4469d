"""A request id the caller chooses is checked by the client against what the server keeps: one with a space was
silently replaced by the server (the caller's log lines and the server's named different ids), and a non-ASCII
one failed the call with a bare INTERNAL "Invalid metadata" from gRPC, before any server saw it."""

from __future__ import annotations

import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.client import ChatbotClient

BAD = ["order 42", "주문-1", "a" * 129, "id\n"]


@pytest.fixture(scope="module")
def client():
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as c:
            yield c


@pytest.mark.parametrize("rid", BAD, ids=["space", "non-ascii", "too-long", "newline"])
def test_a_request_id_the_server_would_not_keep_is_refused_naming_what_is_allowed(client, rid):
    for call in (lambda: client.reply("hi", request_id=rid), lambda: client.classify("hi", request_id=rid),
                 lambda: client.list_models(request_id=rid)):
        with pytest.raises(ValueError, match=r"request_id=.* is invalid; allowed: 1 to 128 characters of A-Z"):
            call()
    with pytest.raises(ValueError, match="request_id"):
        ChatbotClient("127.0.0.1:1", request_id=rid)


def test_a_plain_request_id_is_the_one_the_server_uses(client):
    rid = "order-42:retry_1." + "x" * 111  # 128 characters, every allowed punctuation
    chunks = list(client.reply_stream("hi", request_id=rid))
    assert chunks[-1].request_id == rid and client.last_request_id == rid
    client.classify("hi", request_id="c-1")
    assert client.last_request_id == "c-1"
