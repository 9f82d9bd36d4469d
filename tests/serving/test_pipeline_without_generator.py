"""The classify -> fallback -> generate pipeline on a server that hosts no generator.

`chatforge serve --model intent=... --model tfidf=... --pipeline-classifier intent --oos-threshold 0.99` started, and
every Reply was answered by the selection model (the default Reply model when no generator is hosted) without the
classifier ever running: out-of-scope messages got a pool answer instead of the fallback reply. The pipeline routes
to a generator; a classifier in front of a selection model is what a reply policy is for, so the engine refuses the
combination and says so.
"""

from __future__ import annotations

import pytest
from tests.serving_fakes import FakeClassifier, FakeGenerator

from chatforge.inference import ModelInfo
from chatforge.serving.engine import Engine, PipelineConfig


class FakeSelector:
    def __init__(self, name: str = "tfidf"):
        self.info = ModelInfo(name=name, family="retrieval", task="selection", version="1")
        self.name, self.version = name, "1"

    def select(self, text: str) -> tuple[str, float]:
        return "pool answer", 0.9


def test_a_pipeline_without_a_generator_is_refused_naming_the_policy():
    with pytest.raises(ValueError) as e:
        Engine({}, {"intents": FakeClassifier()}, retrievers={"tfidf": FakeSelector()},
               pipeline=PipelineConfig("intents", "Sorry.", threshold=0.99))
    message = str(e.value)
    assert "pipeline" in message and "hosts no generation model" in message
    assert "reply policy" in message and "generate: false" in message


def test_a_pipeline_with_a_generator_beside_a_selector_still_starts():
    engine = Engine({"echo": FakeGenerator()}, {"intents": FakeClassifier()}, retrievers={"tfidf": FakeSelector()},
                    pipeline=PipelineConfig("intents", "Sorry.", threshold=0.5), continuous_batching=False)
    try:
        assert engine.pipeline is not None and engine.default_generator == "echo"
    finally:
        engine.close()
