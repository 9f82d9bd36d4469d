"""A status's details travel in the trailers, which a gRPC client refuses past 16 KiB ("received metadata size
exceeds hard limit"): an error that quoted a client's long value whole reached the client as RESOURCE_EXHAUSTED
"Stream removed" (a code the client's retry policy retries) instead of the server's NOT_FOUND or INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.client import ChatbotClient, ChatbotError

LONG = "m" * 20_000  # under the 4 MiB message limit, past the 16 KiB metadata limit


@pytest.fixture(scope="module")
def client():
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT, options=[("grpc.enable_retries", 0)]) as c:
            yield c


@pytest.mark.parametrize(("call", "code", "field"), [
    (lambda c: c.reply("hi", model=LONG), grpc.StatusCode.NOT_FOUND, "no generation or selection model named"),
    (lambda c: c.classify("hi", model=LONG), grpc.StatusCode.NOT_FOUND, "no classification model named"),
    (lambda c: c.reply("hi", context=[(LONG, "earlier")]), grpc.StatusCode.INVALID_ARGUMENT, "context[0].role is"),
], ids=["reply-model", "classify-model", "context-role"])
def test_a_long_value_is_quoted_shortened_and_the_status_is_the_servers(client, call, code, field):
    with pytest.raises(ChatbotError) as err:
        call(client)
    assert err.value.code == code, err.value.details
    details = err.value.details
    assert details.startswith(field)
    assert "20000 characters" in details  # says how long the value was
    assert len(details) < 400
    assert "mmmm" in details  # still shows how it starts
    client.reply("hi")  # and the server goes on serving


def test_any_domain_error_message_is_capped_to_fit_the_trailers():
    from chatforge.serving.engine import InvalidRequestError
    from chatforge.serving.interceptors import status_for

    code, message = status_for(InvalidRequestError("가" * 20_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # percent-encoded in the grpc-message trailer: 9 bytes per Hangul syllable; the client's hard limit is 16 KiB
    assert len(message.encode()) * 3 < 16_384
    assert message.startswith("가가가")
