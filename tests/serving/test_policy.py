"""The hybrid reply policy (serving.policy) and the engine path that follows it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.inference import ModelInfo
from chatforge.serving.engine import Engine, InvalidRequestError, ModelNotFoundError, ReplyDone
from chatforge.serving.policy import PolicyError, ReplyPolicy
from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc

FALLBACK = "잘 모르겠어요."


class FakeSelector:
    """Answers "weather" questions with a high score, anything else with a low one."""

    def __init__(self, name: str = "selector"):
        self.info = ModelInfo(name=name, family="retrieval", task="selection", version="7")
        self.name, self.version = name, "7"

    def select(self, text: str) -> tuple[str, float]:
        return ("맑아요.", 1.5) if "weather" in text else ("글쎄요.", 0.2)


def _engine(**policy) -> Engine:
    doc = {"fallback_reply": FALLBACK, "classifier": "intents", "scripted": {"bye": "안녕히 가세요!"},
           "retriever": "selector", "retrieval_threshold": 1.0, **policy}
    return Engine({"echo": FakeGenerator()}, {"intents": FakeClassifier()}, retrievers={"selector": FakeSelector()},
                  policy=ReplyPolicy.from_dict(doc), continuous_batching=False)


async def _reply(engine: Engine, text: str) -> tuple[str, ReplyDone]:
    parts, done = [], None
    async for item in engine.stream_reply(text):
        if isinstance(item, ReplyDone):
            done = item
        else:
            parts.append(item.text)
    return "".join(parts), done


@pytest.mark.parametrize(("text", "reply", "path", "score"), [
    ("bye now", "안녕히 가세요!", "scripted", 0.8),           # intent with a scripted answer
    ("how is the weather", "맑아요.", "retrieval", 1.5),      # retrieval clears the threshold
    ("tell me a story", "Hello there!", "generation", 0.2),  # below it: generation, with the score that fell short
])
def test_each_path_answers_and_says_so(text, reply, path, score):
    engine = _engine()
    try:
        got, done = asyncio.run(_reply(engine, text))
    finally:
        engine.close()
    assert (got, done.path) == (reply, path)
    assert done.path_score == pytest.approx(score)
    assert done.intent in ("greet", "bye")
    if path == "retrieval":
        assert (done.model, done.version) == ("selector", "7")


def test_out_of_scope_and_no_generator_get_the_fallback():
    engine = _engine(intent_threshold=0.9)  # the fake's intents score 0.8: all out of scope
    try:
        got, done = asyncio.run(_reply(engine, "how is the weather"))
    finally:
        engine.close()
    assert (got, done.path, done.finish_reason) == (FALLBACK, "fallback", "fallback")
    engine = _engine(generate=False, classifier=None, scripted={})
    try:
        assert asyncio.run(_reply(engine, "tell me a story"))[1].path == "fallback"
        assert asyncio.run(_reply(engine, "weather?"))[1].path == "retrieval"
    finally:
        engine.close()


def test_policy_config_errors_name_the_key_and_what_is_allowed():
    with pytest.raises(PolicyError, match="unknown key.*retrieval_treshold.*allowed"):
        ReplyPolicy.from_dict({"fallback_reply": "x", "retrieval_treshold": 0.5})
    with pytest.raises(PolicyError, match="fallback_reply is required"):
        ReplyPolicy.from_dict({"retriever": "s"})
    with pytest.raises(PolicyError, match="need a classifier"):
        ReplyPolicy.from_dict({"fallback_reply": "x", "scripted": {"bye": "잘 가"}})
    with pytest.raises(PolicyError, match="retrieval_threshold must be a number"):
        ReplyPolicy.from_dict({"fallback_reply": "x", "retrieval_threshold": "high"})
    with pytest.raises(PolicyError, match="retriever 'nope' is not hosted; selection models: selector"):
        _engine(retriever="nope")


def test_policy_yaml_round_trip(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("fallback_reply: 모르겠어요\nretriever: s\nretrieval_threshold: 0.9\ngenerate: false\n",
                 encoding="utf-8")
    pol = ReplyPolicy.from_yaml(p)
    assert (pol.retriever, pol.retrieval_threshold, pol.generate, pol.classifier) == ("s", 0.9, False, None)


def test_reply_final_over_grpc_says_which_path_answered_and_with_what_score():
    with ServerThread(_engine()) as st:
        st.wait_serving()
        with grpc.insecure_channel(st.target) as channel:
            stub = chatbot_pb2_grpc.ChatbotStub(channel)
            chunks = list(stub.Reply(pb.ReplyRequest(text="how is the weather"), timeout=WAIT))
            assert chunks[0].delta.text == "맑아요."
            final = chunks[-1].final
            assert (final.path, final.model, final.model_version) == ("retrieval", "selector", "7")
            assert final.path_score == pytest.approx(1.5)
            final = list(stub.Reply(pb.ReplyRequest(text="tell me a story"), timeout=WAIT))[-1].final
            assert final.path == "generation" and final.path_score == pytest.approx(0.2)


def test_shipped_policy_loads():
    from pathlib import Path

    pol = ReplyPolicy.from_yaml(Path(__file__).resolve().parents[2] / "configs" / "policies" / "hybrid_chatbot_kr.yaml")
    assert pol.retriever and pol.generate and pol.retrieval_threshold > 0
    assert pol.min_familiarity is not None and pol.min_familiarity < 0  # the README's hybrid has its guard


def test_selection_models_are_listed_and_answer_when_named():
    """A hosted selection model was loaded but missing from ListModels (and /v1/models, so from the chat page's
    picker), and a Reply naming it only answered when the policy happened to route to retrieval: one naming a model
    that does not exist was answered too."""
    engine = _engine(retrieval_threshold=9.0)  # the policy alone would never retrieve
    try:
        listed = {m.name: (m.info.task, m.is_default) for m in engine.models()}
        assert listed == {"echo": ("generation", True), "intents": ("classification", True),
                          "selector": ("selection", False)}
        got, done = asyncio.run(_reply_named(engine, "tell me a story", "selector"))
        assert (got, done.path, done.model, done.version) == ("글쎄요.", "retrieval", "selector", "7")
        assert done.path_score == pytest.approx(0.2) and done.finish_reason == "stop"
        assert asyncio.run(_reply_named(engine, "tell me a story", "echo"))[1].path == "generation"
        with pytest.raises(ModelNotFoundError, match="no generation or selection model named 'nope'; "
                                                     "available: echo, selector"):
            asyncio.run(_reply_named(engine, "how is the weather", "nope"))
        with pytest.raises(ModelNotFoundError, match="named 'intents'"):  # a classifier does not reply
            asyncio.run(_reply_named(engine, "how is the weather", "intents"))
    finally:
        engine.close()


def test_a_server_with_only_a_selection_model_replies_with_it_by_default():
    engine = Engine({}, {}, retrievers={"selector": FakeSelector()}, continuous_batching=False)
    try:
        assert [(m.name, m.is_default) for m in engine.models()] == [("selector", True)]
        got, done = asyncio.run(_reply(engine, "how is the weather"))
        assert (got, done.path, done.path_score) == ("맑아요.", "retrieval", pytest.approx(1.5))
    finally:
        engine.close()


def test_list_models_over_grpc_names_the_selection_model_and_reply_reaches_it():
    with ServerThread(_engine(retrieval_threshold=9.0)) as st:
        st.wait_serving()
        with grpc.insecure_channel(st.target) as channel:
            stub = chatbot_pb2_grpc.ChatbotStub(channel)
            models = {m.name: m.task for m in stub.ListModels(pb.ListModelsRequest(), timeout=WAIT).models}
            assert models["selector"] == "selection"
            chunks = list(stub.Reply(pb.ReplyRequest(text="how is the weather", model="selector"), timeout=WAIT))
            assert chunks[0].delta.text == "맑아요." and chunks[-1].final.path == "retrieval"
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Reply(pb.ReplyRequest(text="hi", model="nope"), timeout=WAIT))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def _reply_named(engine: Engine, text: str, model: str) -> tuple[str, ReplyDone]:
    parts, done = [], None
    async for item in engine.stream_reply(text, model=model):
        if isinstance(item, ReplyDone):
            done = item
        else:
            parts.append(item.text)
    return "".join(parts), done


def test_a_message_too_long_for_the_generator_gets_the_fallback_not_an_error():
    """Before: the hybrid answered a long message when retrieval scored high, and refused the same length with
    INVALID_ARGUMENT when it scored low (the generator's input limit); now the low-score case gets the fallback."""
    doc = {"fallback_reply": FALLBACK, "retriever": "selector", "retrieval_threshold": 1.0}
    engine = Engine({"echo": FakeGenerator(max_input_tokens=4)}, {}, retrievers={"selector": FakeSelector()},
                    policy=ReplyPolicy.from_dict(doc), continuous_batching=False)
    try:
        long_text = "tell me a very long story about the sea"  # 9 tokens for the fake generator
        got, done = asyncio.run(_reply(engine, long_text))
        assert (got, done.path, done.finish_reason) == (FALLBACK, "fallback", "fallback")
        assert (done.model, done.version) == ("selector", "7") and done.path_score == pytest.approx(0.2)
        got, done = asyncio.run(_reply(engine, long_text + " weather"))  # retrieval still answers when it clears
        assert (got, done.path) == ("맑아요.", "retrieval")
        assert asyncio.run(_reply(engine, "short story"))[1].path == "generation"
    finally:
        engine.close()
    plain = Engine({"echo": FakeGenerator(max_input_tokens=4)}, {}, continuous_batching=False)
    try:  # without a policy the generator's limit is the caller's error, as before
        with pytest.raises(InvalidRequestError, match="accepts at most 4 input tokens"):
            asyncio.run(_reply(plain, long_text))
    finally:
        plain.close()
