"""Every status code the server promises, each followed by a successful call; deadline and
cancel free their batch slot (engine counters, not sleeps)."""

from __future__ import annotations

import threading

import grpc
import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, GatedGenerator, ServerThread

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.serving.engine import Engine
from chatforge.serving.metrics import ServingMetrics

NO_RETRY = [("grpc.enable_retries", 0)]


@pytest.fixture(scope="module")
def env():
    gate = threading.Semaphore(0)
    gated = GatedGenerator(gate=gate)
    engine = Engine({"echo": FakeGenerator(), "gated": gated}, {"intents": FakeClassifier()},
                    max_input_chars=200, max_new_tokens=50, max_running=1, max_queued=0)
    metrics = ServingMetrics(process_metrics=False)
    with ServerThread(engine, metrics=metrics, max_message_bytes=4096) as st:
        st.wait_serving()
        yield st, engine, gate, metrics
    gate.release(1000)


def _ok(client):
    assert client.reply("hello", max_new_tokens=3) == "Hello there"
    assert client.classify("bye").label == "bye"


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        ("", {}, "text is empty"),
        ("x" * 201, {}, "allowed: at most 200"),
        (" ".join(["w"] * 40), {}, "accepts at most 32 input tokens"),
        ("hi", {"temperature": 0.0}, "options.temperature=0.0 is out of range"),
        ("hi", {"top_p": 1.5}, "options.top_p=1.5 is out of range"),
        ("hi", {"top_k": -1}, "options.top_k=-1 is out of range"),
        ("hi", {"num_beams": 0}, "options.num_beams=0 is out of range; allowed: an integer in [1, 16]"),
        ("hi", {"num_beams": 17}, "options.num_beams=17 is out of range"),
        ("hi", {"length_penalty": 6.0}, "options.length_penalty=6.0 is out of range"),
        ("hi", {"num_beams": 2, "do_sample": True}, "options.num_beams"),
        ("hi", {"max_new_tokens": 51}, "this server allows at most 50"),
        ("hi", {"max_new_tokens": 0}, "allowed: an integer in [1, 1024]"),
    ],
)
def test_invalid_argument_then_serving(env, text, options, expected):
    st, *_ = env
    with ChatbotClient(st.target, timeout=WAIT) as client:
        with pytest.raises(ChatbotError) as err:
            client.reply(text, **options)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in err.value.details
        _ok(client)


def test_not_found_then_serving(env):
    st, *_ = env
    with ChatbotClient(st.target, timeout=WAIT) as client:
        for call in (lambda: client.reply("hi", model="nope"), lambda: client.classify("hi", model="nope")):
            with pytest.raises(ChatbotError) as err:
                call()
            assert err.value.code == grpc.StatusCode.NOT_FOUND and "'nope'" in err.value.details
        _ok(client)


def test_message_too_large_then_serving(env):
    st, *_ = env
    with ChatbotClient(st.target, timeout=WAIT, options=NO_RETRY) as client:
        with pytest.raises(ChatbotError) as err:
            client.classify("x" * 8000)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        _ok(client)


def test_overloaded_is_resource_exhausted_at_once_then_serving(env):
    st, engine, gate, metrics = env
    with ChatbotClient(st.target, timeout=WAIT, options=NO_RETRY) as client:
        stream = client.reply_stream("hi", model="gated", max_new_tokens=2)
        assert next(stream).token_id == 10  # holds the only slot (max_running=1, max_queued=0)
        with pytest.raises(ChatbotError) as err:
            client.reply("hi", model="gated")
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded: 1 running and 0 queued" in err.value.details
        gate.release()
        assert [c.token_id for c in stream][-1] is None  # finished: the final chunk
        assert client.reply("hi", model="gated", max_new_tokens=1) == "<10>"
        _ok(client)
    assert metrics.value("chatforge_request_failure_total",
                         {"rpc": "Reply", "model": "gated", "reason": "overloaded"}) >= 1


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancel_and_deadline_free_the_slot(env, how):
    st, engine, gate, metrics = env
    dropped, abandoned = engine.dropped, engine.stats.abandoned
    with ChatbotClient(st.target, timeout=WAIT if how == "cancel" else 1.0, options=NO_RETRY) as client:
        stream = client.reply_stream("hi", model="gated", max_new_tokens=50)
        assert next(stream).token_id == 10  # in the batch; the next step waits for the gate
        if how == "cancel":
            stream.close()
        else:
            with pytest.raises(ChatbotError) as err:
                next(stream)  # blocks until the deadline passes (the model is gated)
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # Wait until the server has seen the cancel/deadline (its handler closed the engine's
        # stream, which flags the sequence); only then does "within one step" start.
        assert engine.stats.wait_for(lambda s: s.abandoned == abandoned + 1, WAIT)
        gate.release()  # the step in progress finishes; before the next one the row must be gone
        assert engine.stats.wait_for(lambda s: s.dropped == dropped + 1 and s.running == 0, WAIT)
        assert client.reply("hi", model="gated", max_new_tokens=1) == "<10>"  # the slot is free


def test_unimplemented_without_classifier():
    with ServerThread(Engine({"echo": FakeGenerator()}, {})) as st, ChatbotClient(st.target) as client:
        st.wait_serving()
        with pytest.raises(ChatbotError) as err:
            client.classify("hi")
        assert err.value.code == grpc.StatusCode.UNIMPLEMENTED
        assert client.reply("hello", max_new_tokens=1) == "Hel"
