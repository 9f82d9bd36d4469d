"""An Engine whose routing is refused at construction (a pipeline classifier that is not hosted, a reply policy
that names a missing intent) starts each model's runner first; those runners' threads must end with the
refusal instead of waiting for work forever (a process that retries construction would collect them).
Fails on the code before the fix: the scheduler threads stayed alive."""

from __future__ import annotations

import threading

import pytest
from tests.serving_fakes import FakeClassifier, TinyGPTGenerator, TinySeq2SeqGenerator

from chatforge.serving.engine import Engine, PipelineConfig


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.name.startswith("chatforge-")]


@pytest.mark.parametrize("bad", ["missing classifier", "pipeline without a generator"])
def test_a_refused_engine_stops_the_runners_it_started(bad):
    before = set(threading.enumerate())
    if bad == "missing classifier":
        args = ({"a": TinySeq2SeqGenerator(), "b": TinyGPTGenerator()}, {"intents": FakeClassifier()})
        kw = {"pipeline": PipelineConfig("nope", "sorry", 0.5)}
    else:
        args = ({}, {"intents": FakeClassifier()})
        kw = {"pipeline": PipelineConfig("intents", "sorry", 0.5)}
    with pytest.raises(ValueError):
        Engine(*args, **kw)
    for t in _new_threads(before):
        t.join(timeout=10)  # bounded: a runner told to close ends within one wait
    assert [t.name for t in _new_threads(before) if t.is_alive()] == []
