"""A reply policy names the generator its generation path uses (``generator:``), and ``chatforge replies`` writes
the one its threshold was chosen with.

``policy.yaml`` named the retriever only, so on a server hosting two generators the hybrid's generation path went
to whichever was given first (the default generator), not the one ``chatforge replies`` had measured the hybrid
with: ``serve --model chat=demo --model ranker=... --model transformer=... --policy policy.yaml`` answered with
``chat``, silently."""

from __future__ import annotations

import asyncio

import pytest
from tests.serving_fakes import FakeGenerator

from chatforge.inference import ModelInfo
from chatforge.serving.engine import Engine, ReplyDone
from chatforge.serving.policy import PolicyError, ReplyPolicy


class LowSelector:
    def __init__(self):
        self.info = ModelInfo(name="ranker", family="retrieval", task="selection", version="1")

    @property
    def version(self) -> str:
        return self.info.version

    def select(self, text: str) -> tuple[str, float]:
        return "pool", 0.1  # below every threshold here: the generation path


def _done(engine: Engine, model: str | None = None) -> ReplyDone:
    async def run():
        return [x async for x in engine.stream_reply("hello", model=model)][-1]
    return asyncio.run(run())


def _engine(**doc) -> Engine:
    policy = ReplyPolicy.from_dict({"retriever": "ranker", "retrieval_threshold": 0.9, "fallback_reply": "?", **doc})
    return Engine({"chat": FakeGenerator("chat"), "transformer": FakeGenerator("transformer")}, {},
                  retrievers={"ranker": LowSelector()}, policy=policy, continuous_batching=False)


def test_the_generation_path_uses_the_policys_generator():
    engine = _engine(generator="transformer")
    try:
        done = _done(engine)
        assert (done.model, done.path) == ("transformer", "generation")
        assert _done(engine, model="chat").model == "chat"  # a Reply naming a generator still gets that one
    finally:
        engine.close()


def test_without_a_generator_key_the_default_generator_answers():
    engine = _engine()
    try:
        assert _done(engine).model == "chat"
    finally:
        engine.close()


def test_a_generator_that_is_not_hosted_is_refused_at_startup():
    with pytest.raises(PolicyError, match="policy generator 'ranker' is a selection model; generators: chat, "
                                          "transformer"):
        _engine(generator="ranker")
    with pytest.raises(PolicyError, match="generator 'transformer' is unused with generate: false"):
        ReplyPolicy.from_dict({"generator": "transformer", "generate": False, "fallback_reply": "?"})
