"""`out_of_scope` means the classifier judged the message out of scope. A reply policy's fallback because no path could
answer (retrieval below its threshold and no generator) is not that: before, the HTTP API said out_of_scope: true for
it (it read finish_reason == "fallback"), and gRPC's ReplyFinal had no way to tell the two apart."""

from __future__ import annotations

import asyncio

import grpc
import httpx
from tests.serving.conftest import base_url
from tests.serving.test_policy import FALLBACK, _engine, _reply
from tests.serving_fakes import WAIT, ServerThread

from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc

OOS = {"intent_threshold": 0.9}  # the fake classifier's intents score 0.8: every message is out of scope
NO_PATH = {"generate": False, "classifier": None, "scripted": {}}  # low retrieval score, no generator


def test_the_engine_tells_an_out_of_scope_fallback_from_a_no_path_fallback():
    for policy, want in ((OOS, True), (NO_PATH, False)):
        engine = _engine(**policy)
        try:
            got, done = asyncio.run(_reply(engine, "tell me a story"))
        finally:
            engine.close()
        assert (got, done.path, done.finish_reason) == (FALLBACK, "fallback", "fallback")
        assert done.out_of_scope is want, policy


def test_grpc_reply_final_and_the_http_extension_say_the_same():
    for policy, want in ((OOS, True), (NO_PATH, False)):
        with ServerThread(_engine(**policy), http_port=0) as st:
            st.wait_serving()
            with grpc.insecure_channel(st.target) as channel:
                stub = chatbot_pb2_grpc.ChatbotStub(channel)
                final = list(stub.Reply(pb.ReplyRequest(text="tell me a story"), timeout=WAIT))[-1].final
            with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
                body = http.post("/v1/chat/completions", json={
                    "model": "echo", "messages": [{"role": "user", "content": "tell me a story"}]}).json()
        assert (final.path, final.finish_reason, final.out_of_scope) == ("fallback", "fallback", want), policy
        assert body["choices"][0]["message"]["content"] == FALLBACK
        assert body["chatforge"]["out_of_scope"] is want and body["chatforge"]["path"] == "fallback", body


def test_an_answered_message_is_not_out_of_scope():
    with ServerThread(_engine(), http_port=0) as st:
        st.wait_serving()
        with grpc.insecure_channel(st.target) as channel:
            stub = chatbot_pb2_grpc.ChatbotStub(channel)
            final = list(stub.Reply(pb.ReplyRequest(text="how is the weather"), timeout=WAIT))[-1].final
    assert final.path == "retrieval" and final.out_of_scope is False
