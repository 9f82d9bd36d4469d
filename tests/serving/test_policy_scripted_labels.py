"""A reply policy's scripted answers must name intents its classifier can predict; checked at start-up.

``scripted: {greting: ...}`` (a typo, or a label of another classifier) started a server whose scripted answer
could never be given: every such message silently went on to retrieval or generation."""

from __future__ import annotations

import pytest
from tests.serving_fakes import FakeClassifier, FakeGenerator

from chatforge.serving.engine import Engine
from chatforge.serving.policy import PolicyError, ReplyPolicy


def _engine(scripted: dict[str, str]) -> Engine:
    policy = ReplyPolicy.from_dict({"classifier": "intents", "scripted": scripted, "fallback_reply": "?"})
    return Engine({"echo": FakeGenerator()}, {"intents": FakeClassifier(labels=("greet", "bye", "oos"))},
                  policy=policy, continuous_batching=False)


def test_a_scripted_intent_the_classifier_does_not_know_is_refused():
    with pytest.raises(PolicyError, match=r"policy scripted intent\(s\) greeting are not labels of classifier "
                                          r"'intents'; its labels: bye, greet, oos"):
        _engine({"greeting": "안녕하세요!", "bye": "안녕히 가세요!"})


def test_known_intents_start():
    engine = _engine({"bye": "안녕히 가세요!"})
    engine.close()
    assert engine.policy.scripted == {"bye": "안녕히 가세요!"}
