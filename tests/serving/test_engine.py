"""Engine: streaming off the event loop, validation, cancellation, counters. No grpc here."""

from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing

import pytest
from tests.serving_fakes import (
    WAIT,
    BlockingGenerator,
    FailingGenerator,
    FakeClassifier,
    FakeGenerator,
    LockstepGenerator,
    make_engine,
)

from chatforge.decoding import GenerationOptions
from chatforge.inference import TokenDelta
from chatforge.serving.engine import (
    Engine,
    EngineShutdownError,
    InvalidRequestError,
    ModelNotFoundError,
    NoModelForTaskError,
    ReplyDone,
)


async def _collect(engine, text="hello there", options=None, model=None):
    return [item async for item in engine.stream_reply(text, options, model)]


def test_stream_yields_deltas_then_done_with_counts():
    engine = make_engine()
    items = asyncio.run(_collect(engine, options=GenerationOptions(max_new_tokens=10)))
    deltas, done = items[:-1], items[-1]
    assert [d.text for d in deltas] == ["Hel", "lo", " there", "!"]
    assert all(isinstance(d, TokenDelta) for d in deltas)
    assert done == ReplyDone(finish_reason="stop", prompt_tokens=2, completion_tokens=4, model="echo", version="1")
    assert engine.completed == 1 and engine.active == 0


def test_finish_reason_length_and_named_model():
    engine = make_engine()
    items = asyncio.run(_collect(engine, options=GenerationOptions(max_new_tokens=2), model="other"))
    assert items[-1].finish_reason == "length"
    assert items[-1].completion_tokens == 2 and items[-1].model == "other"
    assert engine.generators["other"].calls[0][1].max_new_tokens == 2


def test_model_runs_off_the_event_loop_and_tokens_arrive_before_the_end():
    gen = LockstepGenerator(n=3)
    engine = Engine({"lock": gen}, {})
    threads = []
    original = gen.stream

    def recording_stream(text, options):
        threads.append(threading.current_thread())
        yield from original(text, options)

    gen.stream = recording_stream

    async def main():
        loop_thread = threading.current_thread()
        got = []
        async for item in engine.stream_reply("hi", GenerationOptions()):
            if isinstance(item, TokenDelta):
                got.append(item.text)
                gen.acks[len(got) - 1].set()  # the generator waits for this before the next token
        return loop_thread, got

    loop_thread, got = asyncio.run(main())
    assert got == ["t0 ", "t1 ", "t2 "]
    assert threads and threads[0] is not loop_thread


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("", None, "text is empty"),
        ("   ", None, "text is empty"),
        ("x" * 201, None, "at most 200"),
        ("hi", GenerationOptions(temperature=0.0), "temperature"),
        ("hi", GenerationOptions(top_p=1.5), "top_p"),
        ("hi", GenerationOptions(max_new_tokens=0), "max_new_tokens"),
        (" ".join(["w"] * 40), None, "accepts at most 32 input tokens"),
    ],
)
def test_invalid_requests_raise_with_a_clear_message(text, options, message):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match=message):
        asyncio.run(_collect(engine, text=text, options=options))
    assert engine.failed == 0


def test_unknown_model_lists_available_ones():
    engine = make_engine()
    with pytest.raises(ModelNotFoundError, match=r"'nope'.*available: echo, other"):
        asyncio.run(_collect(engine, model="nope"))


def test_no_classifier_and_no_generator():
    engine = Engine({"echo": FakeGenerator()}, {})
    with pytest.raises(NoModelForTaskError, match="hosts no classification model"):
        asyncio.run(engine.classify(["hi"]))
    engine = Engine({}, {"intents": FakeClassifier()})
    with pytest.raises(NoModelForTaskError, match="hosts no generation model"):
        asyncio.run(_collect(engine))


def test_consumer_closing_stops_the_worker_within_a_token():
    gen = BlockingGenerator()
    engine = Engine({"block": gen}, {})

    async def main():
        async with aclosing(engine.stream_reply("hi", GenerationOptions())) as stream:
            first = await stream.__anext__()
            assert first.text == "first"
        # aclosing has closed the stream: the worker sees the stop flag at its next token.
        gen.release.set()

    asyncio.run(main())
    assert gen.closed.wait(WAIT), "the engine did not close the model's generator"
    assert engine.wait_idle(WAIT)
    assert engine.cancelled == 1 and engine.completed == 0
    assert gen.produced < BlockingGenerator.LIMIT  # stopped by the engine, not by running out


def test_generator_error_propagates_and_counts_as_failed():
    engine = Engine({"bad": FailingGenerator()}, {})
    with pytest.raises(RuntimeError, match="secret"):
        asyncio.run(_collect(engine))
    assert engine.wait_idle(WAIT)
    assert engine.failed == 1


def test_classify_and_validation():
    engine = make_engine()
    preds = asyncio.run(engine.classify(["hello", "bye bye"]))
    assert [p.label for p in preds] == ["greet", "bye"]
    with pytest.raises(InvalidRequestError, match="list of strings"):
        asyncio.run(engine.classify("hello"))
    with pytest.raises(InvalidRequestError, match=r"texts\[1\] is empty"):
        asyncio.run(engine.classify(["ok", ""]))
    with pytest.raises(ModelNotFoundError, match="available: intents"):
        asyncio.run(engine.classify(["hi"], model="x"))


def test_models_and_defaults():
    engine = make_engine()
    assert engine.default_generator == "echo" and engine.default_classifier == "intents"
    assert [(m.name, m.info.task, m.is_default) for m in engine.models()] == [
        ("echo", "generation", True),
        ("other", "generation", False),
        ("intents", "classification", True),
    ]


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_running=0 is out of range"):
        Engine({}, {}, max_running=0)
    with pytest.raises(ValueError, match="used twice: x"):
        Engine({"x": FakeGenerator()}, {"x": FakeClassifier()})


def test_closed_engine_refuses_work():
    engine = make_engine()
    engine.close()
    with pytest.raises(EngineShutdownError):
        asyncio.run(_collect(engine))


def test_from_bundles_sorts_models_by_protocol(monkeypatch, tmp_path):
    import chatforge.inference as inference

    loaded = {}

    def fake_load_model(bundle_dir, name, version="1", precision="fp32"):
        loaded[name] = bundle_dir
        return FakeGenerator(name) if name == "gen" else FakeClassifier(name)

    monkeypatch.setattr(inference, "load_model", fake_load_model, raising=False)
    engine = Engine.from_bundles({"gen": tmp_path / "g", "clf": str(tmp_path / "c")}, max_input_chars=50)
    assert list(engine.generators) == ["gen"] and list(engine.classifiers) == ["clf"]
    assert loaded["clf"] == tmp_path / "c"
    assert engine.max_input_chars == 50


def test_the_character_limit_counts_decomposed_korean_as_composed():
    """Before: NFD Hangul (2-3 letters per syllable) was refused at a third of the composed length."""
    import unicodedata

    engine = Engine({"gen": FakeGenerator("gen")}, {}, max_input_chars=10)
    try:
        composed = "결혼하면 좋을까요"  # 9 characters
        decomposed = unicodedata.normalize("NFD", composed)
        assert len(decomposed) > 10
        engine.check_text(composed)
        engine.check_text(decomposed)  # the same 9 characters, spelt in letters
        with pytest.raises(InvalidRequestError, match="is 12 characters long; allowed: at most 10"):
            engine.check_text(unicodedata.normalize("NFD", "결혼하면 좋을까요???"))
    finally:
        engine.close()
