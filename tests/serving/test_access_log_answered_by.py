"""The access log line and the metrics say which model answered a reply, and how.

With a reply policy the model that answers is often not the one the call was admitted to: served with
``--model ranker=... --model gpt=... --policy``, every Reply was logged ``"model": "gpt"`` (the default generator)
although the ranker, a scripted answer or the fallback had answered, while the client's ``ReplyFinal.model`` and the
conversation store said ``ranker``: the logs did not match the client and the store, and nothing counted how often
the familiarity guard or the classifier sent a message to the fallback. Now the log line names the answering model
with ``path`` and ``out_of_scope`` (gRPC and HTTP alike) and ``chatforge_reply_paths_total{path, model,
out_of_scope}`` counts them. Every test here fails on the old code."""

from __future__ import annotations

import json
import logging

import grpc
import httpx
from tests.serving.conftest import base_url
from tests.serving.test_policy_familiarity import _engine as guarded_engine
from tests.serving_fakes import WAIT, FakeGenerator, FakeSelector, ServerThread

from chatforge.serving.engine import Engine
from chatforge.serving.metrics import ServingMetrics
from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc

CASES = {  # message -> (path, model, out_of_scope) under the guarded policy (retrieval threshold 0.99: generation)
    "asdf qwer zxcv": ("fallback", "selector", True),
    "오늘 날씨 어때": ("generation", "echo", False),
}


async def _noop():
    return None


def _answered(caplog, request_id: str) -> logging.LogRecord:
    (rec,) = [r for r in caplog.records if getattr(r, "request_id", None) == request_id
              and r.name in ("chatforge.serving.interceptors", "chatforge.serving.http")]
    return rec


def test_grpc_and_http_log_lines_name_the_model_that_answered(caplog):
    metrics = ServingMetrics(process_metrics=False)
    engine = guarded_engine(FakeSelector(), retrieval_threshold=0.99)
    with caplog.at_level(logging.INFO), ServerThread(engine, http_port=0, metrics=metrics) as st:
        st.wait_serving()
        seen = {}
        with grpc.insecure_channel(st.target) as channel, httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            stub = chatbot_pb2_grpc.ChatbotStub(channel)
            for i, text in enumerate(CASES):
                final = list(stub.Reply(pb.ReplyRequest(text=text), timeout=WAIT,
                                        metadata=(("x-request-id", f"grpc-{i}"),)))[-1].final
                body = http.post("/v1/chat/completions", headers={"x-request-id": f"http-{i}"}, json={
                    "model": "echo", "messages": [{"role": "user", "content": text}]}).json()
                seen[text] = (final.model, body["model"])
        st.run(_noop())  # the log line is written as the call finishes, which may be just after the client saw it
    for i, (text, (path, model, oos)) in enumerate(CASES.items()):
        assert seen[text] == (model, model), text  # what the clients were told
        for rid in (f"grpc-{i}", f"http-{i}"):
            rec = _answered(caplog, rid)
            assert (rec.model, rec.path, rec.out_of_scope) == (model, path, oos), (rid, rec.__dict__)
        sample = metrics.registry.get_sample_value(
            "chatforge_reply_paths_total", {"path": path, "model": model, "out_of_scope": str(oos).lower()})
        assert sample == 2, (text, sample)  # one gRPC and one HTTP reply


def test_a_reply_without_a_policy_counts_as_generation():
    metrics = ServingMetrics(process_metrics=False)
    engine = Engine({"echo": FakeGenerator()}, {}, continuous_batching=False)
    with ServerThread(engine, metrics=metrics) as st, grpc.insecure_channel(st.target) as channel:
        st.wait_serving()
        list(chatbot_pb2_grpc.ChatbotStub(channel).Reply(pb.ReplyRequest(text="hi"), timeout=WAIT))
    assert metrics.registry.get_sample_value(
        "chatforge_reply_paths_total", {"path": "generation", "model": "echo", "out_of_scope": "false"}) == 1


def test_an_http_reply_cut_by_a_stop_sequence_names_the_model_and_path_that_answered(caplog):
    """A generated reply cut by a stop sequence ends before the engine's ReplyDone. Its log line named the model the
    call was admitted to, without ``path``, and the reply-path metric did not count it (fails on the old code)."""
    metrics = ServingMetrics(process_metrics=False)
    engine = guarded_engine(FakeSelector(), retrieval_threshold=0.99)  # the echo generator answers Korean text
    with caplog.at_level(logging.INFO), ServerThread(engine, http_port=0, metrics=metrics) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            for stream in (False, True):
                r = http.post("/v1/chat/completions", headers={"x-request-id": f"stop-{stream}"}, json={
                    "model": "echo", "messages": [{"role": "user", "content": "오늘 날씨 어때"}],
                    "stop": [" there"], "stream": stream})  # the fake generator says "Hello there!"
                assert r.status_code == 200, r.text
                if stream:
                    events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
                    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
                else:
                    text = r.json()["choices"][0]["message"]["content"]
                assert text == "Hello", text  # cut before the stop sequence
        st.run(_noop())
    for stream in (False, True):
        rec = _answered(caplog, f"stop-{stream}")
        assert (rec.model, rec.path, rec.out_of_scope) == ("echo", "generation", False), rec.__dict__
    assert metrics.registry.get_sample_value(
        "chatforge_reply_paths_total", {"path": "generation", "model": "echo", "out_of_scope": "false"}) == 2
