"""A whole reply (retrieval, or the fallback of an out-of-scope classification) names the version that chose it,
also when that model is hot-swapped while the reply is being chosen.

The engine looked the version up by name after the model had answered: a selection model swapped during its
``select`` call (a few ms per call, so under steady traffic every swap hit the replies in flight) labelled the old
version's answer with the new version, in ReplyFinal.model_version, the conversation store and the logs.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator

from chatforge.inference import ModelInfo
from chatforge.predictions import ClassPrediction
from chatforge.serving.engine import Engine, ReplyDone
from chatforge.serving.policy import ReplyPolicy


class GatedSelector:
    """Answers with its own version; ``select`` waits for ``release`` once ``entered`` is set (when gated)."""

    def __init__(self, version: str, gated: bool = False):
        self.info = ModelInfo(name="tfidf", family="retrieval", task="selection", version=version)
        self.entered, self.release, self.gated = threading.Event(), threading.Event(), gated

    @property
    def version(self) -> str:
        return self.info.version

    def select(self, text: str) -> tuple[str, float]:
        if self.gated:
            self.entered.set()
            assert self.release.wait(WAIT)
        return f"answer of v{self.info.version}", 0.9


class GatedOosClassifier(FakeClassifier):
    """Judges every text out of scope; waits for ``release`` once ``entered`` is set (when gated)."""

    def __init__(self, version: str, gated: bool = False):
        super().__init__()
        self.info.version = version
        self.entered, self.release, self.gated = threading.Event(), threading.Event(), gated

    def classify(self, texts):
        if self.gated:
            self.entered.set()
            assert self.release.wait(WAIT)
        return [ClassPrediction(label="oos", score=0.9, scores={"oos": 0.9}, out_of_scope=True) for _ in texts]


async def _reply_during_swap(engine: Engine, old, new, name: str, model: str | None) -> tuple[str, ReplyDone]:
    async def reply():
        parts, done = [], None
        async for item in engine.stream_reply("hello", model=model):
            if isinstance(item, ReplyDone):
                done = item
            else:
                parts.append(item.text)
        return "".join(parts), done

    task = asyncio.ensure_future(reply())
    assert await asyncio.to_thread(old.entered.wait, WAIT)  # the old version is choosing the reply now
    engine.swap(name, new)
    old.release.set()
    return await asyncio.wait_for(task, WAIT)


@pytest.mark.parametrize("model", ["tfidf", None], ids=["named-selector", "policy-retrieval"])
def test_a_retrieval_reply_names_the_version_that_chose_it(model):
    old, new = GatedSelector("1", gated=True), GatedSelector("2")
    policy = None if model else ReplyPolicy.from_dict({"retriever": "tfidf", "retrieval_threshold": 0.5,
                                                       "generate": True, "fallback_reply": "?"})
    engine = Engine({"echo": FakeGenerator()}, {}, retrievers={"tfidf": old}, policy=policy,
                    continuous_batching=False)
    try:
        text, done = asyncio.run(_reply_during_swap(engine, old, new, "tfidf", model))
    finally:
        engine.close()
    assert text == "answer of v1"
    assert (done.model, done.version, done.path) == ("tfidf", "1", "retrieval")
    assert engine.version_of("tfidf") == "2"  # the swap itself happened


def test_an_out_of_scope_fallback_names_the_classifier_version_that_judged_it():
    old, new = GatedOosClassifier("1", gated=True), GatedOosClassifier("2")
    policy = ReplyPolicy.from_dict({"classifier": "intents", "generate": True, "fallback_reply": "모르겠어요"})
    engine = Engine({"echo": FakeGenerator()}, {"intents": old}, policy=policy, continuous_batching=False)
    try:
        text, done = asyncio.run(_reply_during_swap(engine, old, new, "intents", None))
    finally:
        engine.close()
    assert text == "모르겠어요"
    assert (done.model, done.version, done.path, done.out_of_scope) == ("intents", "1", "fallback", True)
    assert engine.version_of("intents") == "2"
