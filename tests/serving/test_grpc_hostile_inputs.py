"""A hostile gRPC client: inputs that were accepted and then lost or merged in the conversation store now get
INVALID_ARGUMENT naming what was wrong, and nothing reaches the store.

Found by attacking a real ``chatforge serve`` process; reproduced here in-process (``ServerThread``, 127.0.0.1)."""

from __future__ import annotations

import grpc
import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.serving.engine import Engine
from chatforge.serving.store import ConversationStore
from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

OPTS = pb.GenerationOptions(max_new_tokens=2)


@pytest.fixture
def served(tmp_path):
    store = ConversationStore(f"sqlite:///{tmp_path / 'turns.db'}")
    engine = Engine({"echo": FakeGenerator()}, {"intents": FakeClassifier()}, continuous_batching=False)
    with ServerThread(engine, store=store) as st, grpc.insecure_channel(st.target) as channel:
        st.wait_serving()
        yield pb_grpc.ChatbotStub(channel), store


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_an_over_long_session_header_is_refused_not_cut(served):
    """The x-session-id header was cut to its first 128 characters: two clients whose ids share them wrote into
    one conversation. The ReplyRequest.session_id field was already refused past 128."""
    stub, store = served
    long_a, long_b = "s" * 128 + "a", "s" * 128 + "b"
    for sid in (long_a, long_b):
        code, details = _status(lambda sid=sid: list(stub.Reply(pb.ReplyRequest(text="hi", options=OPTS),
                                                                 metadata=(("x-session-id", sid),), timeout=WAIT)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "x-session-id is 129 characters long; allowed: at most 128"
    code, _ = _status(lambda: stub.Classify(pb.ClassifyRequest(text="hi"), metadata=(("x-session-id", long_a),),
                                            timeout=WAIT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # 128 characters are fine, and the server keeps serving
    list(stub.Reply(pb.ReplyRequest(text="ok", options=OPTS), metadata=(("x-session-id", "s" * 128),),
                    timeout=WAIT))
    store.flush()
    assert [r["user_text"] for r in store.session("s" * 128)] == ["ok"]


@pytest.mark.parametrize("call, field", [
    (lambda stub: list(stub.Reply(pb.ReplyRequest(text="hi\x00there", options=OPTS), timeout=WAIT)), "text"),
    (lambda stub: list(stub.Reply(pb.ReplyRequest(text="hi", session_id="a\x00b", options=OPTS), timeout=WAIT)),
     "session_id"),
    (lambda stub: list(stub.Reply(pb.ReplyRequest(
        text="hi", options=OPTS, context=[pb.ContextTurn(role="user", text="x\x00")]), timeout=WAIT)), "context[0]"),
    (lambda stub: stub.Classify(pb.ClassifyRequest(text="x\x00y"), timeout=WAIT), "text"),
], ids=["reply-text", "session-field", "context", "classify-text"])
def test_a_nul_character_is_refused_naming_the_field(served, call, field):
    """A NUL went through (proto strings may hold it) and the call succeeded, but PostgreSQL's text columns cannot
    hold NUL: the store lost the turn after retrying its batch, and logged an error per try. (A header value cannot
    carry NUL: grpc refuses it on the client.)"""
    stub, store = served
    code, details = _status(lambda: call(stub))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field) and "NUL" in details and "allowed" in details, details
    list(stub.Reply(pb.ReplyRequest(text="still here", session_id="after", options=OPTS), timeout=WAIT))
    store.flush()
    assert [r["user_text"] for r in store.session("after")] == ["still here"]
