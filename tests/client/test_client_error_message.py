"""An INTERNAL error's message names its request id once: the server's details already carry it ("internal error
(request id X)"), and ChatbotError appended it again ("... (request id X) [request id X]", as `chatforge chat` showed)."""

from __future__ import annotations

import grpc
import pytest
from tests.serving_fakes import WAIT, FailingGenerator, ServerThread, make_engine

from chatforge.client import ChatbotClient, ChatbotError


def test_an_internal_error_names_its_request_id_once():
    with ServerThread(make_engine(generators={"fail": FailingGenerator(name="fail")})) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as client:
            with pytest.raises(ChatbotError) as err:
                client.reply("hi", request_id="req-int-1")
    assert err.value.code == grpc.StatusCode.INTERNAL and err.value.request_id == "req-int-1"
    assert str(err.value) == "INTERNAL: internal error (request id req-int-1)"


def test_other_errors_still_name_the_request_id():
    assert str(ChatbotError(grpc.StatusCode.NOT_FOUND, "no model named 'x'", "r-1")) == \
        "NOT_FOUND: no model named 'x' [request id r-1]"
