"""The engine's ERROR line for a model failure (the one with the traceback) names the calls it failed: a classifier
batch or a decoding step that raised logged "classifier 'bad' failed" / "model 'x' failed while generating" with
request_id null, so the traceback could not be found from the failed call's request id (the access line's)."""

from __future__ import annotations

import logging

import pytest
from tests.serving_fakes import (
    WAIT,
    FakeClassifier,
    FakeGenerator,
    GatedGenerator,
    ServerThread,
    json_log_lines,
    make_engine,
)

from chatforge.client import ChatbotClient, ChatbotError


class BrokenClassifier(FakeClassifier):
    def classify(self, texts):
        raise RuntimeError("classifier weights are corrupt")


class BrokenStepGenerator(GatedGenerator):
    """Continuous batching whose decoding step raises (the prefill works: one token, then the step fails)."""

    def __init__(self):
        super().__init__(name="broken")

        def step(state, tokens):
            raise RuntimeError("CUDA error: device-side assert triggered")

        self.step_model.step = step


@pytest.fixture
def json_lines():
    with json_log_lines(logging.INFO) as lines:
        yield lines


def test_the_failure_line_names_the_request_it_failed(json_lines):
    engine = make_engine(generators={"echo": FakeGenerator(), "broken": BrokenStepGenerator()},
                         classifiers={"bad": BrokenClassifier("bad")})
    with ServerThread(engine) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as client:
            with pytest.raises(ChatbotError):
                client.classify("hi", request_id="clf-fail-1")
            with pytest.raises(ChatbotError):
                client.reply("hi", model="broken", request_id="gen-fail-1", session_id="conv-9")
    lines = json_lines()
    for rid, event in (("clf-fail-1", "classifier 'bad' failed"), ("gen-fail-1", "model 'broken' failed while generating")):
        (line,) = [d for d in lines if d["logger"] == "chatforge.serving.batching" and d["event"] == event]
        assert "exc" in line  # the traceback
        assert line["request_id"] == rid and line["request_ids"] == [rid], line
    (gen,) = [d for d in lines if d["event"] == "model 'broken' failed while generating"]
    assert gen["session_id"] == "conv-9"
