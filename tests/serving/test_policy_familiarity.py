"""The reply policy's familiarity guard (``min_familiarity``): a message unlike the retriever's training questions is
out of scope and gets the fallback reply, before retrieval or generation answers it.

Before it, a selector always answered with its best pool answer, and the shipped ChatbotData ranker's score was not
calibrated for such text: keyboard mash ("asdf qwer zxcv") scored 0.992 and 95 % of English CLINC150 utterances
cleared the hybrid's retrieval threshold (0.911), so the Korean bot answered them with confident, random replies.
On the old code every test here fails: ``min_familiarity`` was an unknown policy key."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import httpx
import pytest
from tests.deploy_helpers import train_tiny_selector
from tests.serving.conftest import base_url
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, FakeSelector, ServerThread

from chatforge.client import ChatbotClient
from chatforge.inference import load_model
from chatforge.serving.engine import Engine, ReplyDone
from chatforge.serving.policy import PolicyError, ReplyPolicy
from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc

FALLBACK = "잘 모르겠어요."


GuardedSelector = FakeSelector  # familiar with Korean text (-3), not with anything else (-11)


def _engine(selector: GuardedSelector, **policy) -> Engine:
    doc = {"fallback_reply": FALLBACK, "retriever": "selector", "min_familiarity": -6.0,
           "retrieval_threshold": 0.9, **policy}
    return Engine({"echo": FakeGenerator()}, {"intents": FakeClassifier()}, retrievers={"selector": selector},
                  policy=ReplyPolicy.from_dict(doc), continuous_batching=False)


def _reply(engine: Engine, text: str) -> tuple[str, ReplyDone]:
    async def run():
        items = [x async for x in engine.stream_reply(text)]
        return "".join(x.text for x in items[:-1]), items[-1]
    return asyncio.run(run())


def test_an_unfamiliar_message_gets_the_fallback_as_out_of_scope_before_retrieval():
    selector = GuardedSelector()
    engine = _engine(selector)
    try:
        got, done = _reply(engine, "asdf qwer zxcv")
        assert (got, done.path, done.finish_reason, done.out_of_scope) == (FALLBACK, "fallback", "fallback", True)
        assert (done.model, done.version) == ("selector", "3")  # the model whose guard decided
        assert selector.selected == []  # the selector never picked a pool answer for it
        got, done = _reply(engine, "오늘 날씨 어때")
        assert (got, done.path, done.out_of_scope) == ("맑아요.", "retrieval", False)
        assert selector.selected == ["오늘 날씨 어때"]
    finally:
        engine.close()


def test_the_guard_stands_before_generation_too():
    selector = GuardedSelector()
    engine = _engine(selector, retrieval_threshold=0.99)  # the selector's 0.95 falls short: generation answers
    try:
        assert _reply(engine, "오늘 날씨 어때")[1].path == "generation"
        assert _reply(engine, "tell me a story")[1].path == "fallback"  # not the generator
    finally:
        engine.close()


def test_the_classifier_still_decides_first():
    engine = _engine(GuardedSelector(), classifier="intents", intent_threshold=0.9)  # the fake scores 0.8: oos
    try:
        done = _reply(engine, "오늘 날씨 어때")[1]
        assert (done.path, done.model, done.out_of_scope) == ("fallback", "intents", True)
    finally:
        engine.close()


def test_bad_guards_are_refused_naming_what_is_allowed():
    with pytest.raises(PolicyError, match="min_familiarity needs a retriever"):
        ReplyPolicy.from_dict({"fallback_reply": "x", "min_familiarity": -5})
    for bad in (0.0, 0.5, float("nan"), float("-inf")):
        with pytest.raises(PolicyError, match=f"min_familiarity={bad!r} is out of range; allowed: a number below 0"):
            ReplyPolicy.from_dict({"fallback_reply": "x", "retriever": "s", "min_familiarity": bad})
    with pytest.raises(PolicyError, match="min_familiarity must be a number, got 'low'"):
        ReplyPolicy.from_dict({"fallback_reply": "x", "retriever": "s", "min_familiarity": "low"})
    # left empty in YAML: no guard, as when omitted
    assert ReplyPolicy.from_dict({"fallback_reply": "x", "retriever": "s", "min_familiarity": None}).min_familiarity \
        is None


def test_grpc_and_the_http_api_say_out_of_scope_for_a_guarded_message():
    with ServerThread(_engine(GuardedSelector()), http_port=0) as st:
        st.wait_serving()
        with grpc.insecure_channel(st.target) as channel:
            stub = chatbot_pb2_grpc.ChatbotStub(channel)
            final = list(stub.Reply(pb.ReplyRequest(text="asdf qwer zxcv"), timeout=WAIT))[-1].final
            kept = list(stub.Reply(pb.ReplyRequest(text="오늘 날씨 어때"), timeout=WAIT))[-1].final
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            body = http.post("/v1/chat/completions", json={
                "model": "echo", "messages": [{"role": "user", "content": "asdf qwer zxcv"}]}).json()
    assert (final.path, final.finish_reason, final.out_of_scope, final.model) == ("fallback", "fallback", True,
                                                                                  "selector")
    assert (kept.path, kept.out_of_scope) == ("retrieval", False)
    assert body["choices"][0]["message"]["content"] == FALLBACK
    assert body["chatforge"]["out_of_scope"] is True and body["chatforge"]["path"] == "fallback"


@pytest.mark.slow
def test_a_trained_selection_bundle_guards_a_served_hybrid(tmp_path: Path):
    """A real TF-IDF selector trained on the sample corpus, loaded as ``chatforge serve`` loads it, behind a policy
    file: its own training questions are answered, random Hangul syllables get the fallback as out of scope."""
    bundle = train_tiny_selector(tmp_path)  # TF-IDF, 5 neighbours
    selector = load_model(bundle, "faq")
    known = ["오늘 날씨 어때?", "배고파", "너 이름이 뭐야?"]
    rng = random.Random(0)
    mash = ["".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(5)) for _ in range(5)]
    guard = min(selector.familiarity(t) for t in known) - 1.0
    assert max(selector.familiarity(t) for t in mash) < guard  # what the test below relies on
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"retriever: faq\nmin_familiarity: {guard}\nretrieval_threshold: 0.0\ngenerate: false\n"
                      f"fallback_reply: {FALLBACK}\n", encoding="utf-8")
    engine = Engine({}, {}, retrievers={"faq": selector}, policy=ReplyPolicy.from_yaml(policy),
                    continuous_batching=False)
    with ServerThread(engine) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as client:
            for text in known:
                final = list(client.reply_stream(text))[-1]
                assert (final.path, final.out_of_scope, final.model) == ("retrieval", False, "faq"), text
            for text in mash:
                chunks = list(client.reply_stream(text))
                assert chunks[0].text == FALLBACK
                assert (chunks[-1].path, chunks[-1].out_of_scope, chunks[-1].finish_reason) == (
                    "fallback", True, "fallback"), text
