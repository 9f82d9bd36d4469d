"""The request id comes back where the API's documentation says: the proto said "in the response's initial metadata",
where a caller found nothing (the server sends no headers of its own, so that errors before the first message stay
retryable); it travels in the trailing metadata of every call, errors included, and in ReplyFinal.request_id."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

PROTO = Path(__file__).resolve().parents[2] / "proto" / "chatforge" / "v1" / "chatbot.proto"


def _header_comment() -> str:
    lines = []
    for line in PROTO.read_text().splitlines():
        if not line.startswith("//"):
            break
        lines.append(line.removeprefix("//").strip())
    return " ".join(lines)


@pytest.fixture(scope="module")
def stub():
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        with grpc.insecure_channel(st.target) as channel:
            yield pb_grpc.ChatbotStub(channel)


def test_the_proto_says_where_the_request_id_comes_back():
    doc = _header_comment()
    assert "initial metadata" not in doc
    assert "trailing metadata" in doc and "ReplyFinal.request_id" in doc


def test_the_request_id_is_in_the_trailers_of_every_call(stub):
    md = (("x-request-id", "doc-1"),)
    call = stub.Reply(pb.ReplyRequest(text="hi"), metadata=md, timeout=WAIT)
    chunks = list(call)
    assert dict(call.trailing_metadata())["x-request-id"] == "doc-1" == chunks[-1].final.request_id
    _, call = stub.Classify.with_call(pb.ClassifyRequest(text="hi"), metadata=md, timeout=WAIT)
    assert dict(call.trailing_metadata())["x-request-id"] == "doc-1"
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Reply(pb.ReplyRequest(text=""), metadata=md, timeout=WAIT))
    assert dict(err.value.trailing_metadata())["x-request-id"] == "doc-1"
