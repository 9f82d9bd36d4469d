"""Engine scheduling: continuous batching, micro-batching, limits, dropping cancelled work. No grpc."""

from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing

import pytest
from tests.serving_fakes import (
    WAIT,
    FakeClassifier,
    FakeGenerator,
    GatedGenerator,
    TinyGPTGenerator,
    TinySeq2SeqGenerator,
    make_engine,
)

from chatforge.decoding import GenerationOptions
from chatforge.inference import TokenDelta
from chatforge.serving.engine import Engine, EngineOverloadedError, ReplyDone


async def _tokens(engine, text, options, model=None):
    return [d.token_id async for d in engine.stream_reply(text, options, model) if isinstance(d, TokenDelta)]


@pytest.mark.parametrize("make", [TinySeq2SeqGenerator, TinyGPTGenerator], ids=["transformer", "gpt"])
def test_continuous_batching_matches_decoding_each_request_alone(make):
    # GPT rows join with prompts of different lengths (left-padded, each at its own position) and leave
    # when they end; before GPTStepModel it ran one thread per request ("threaded").
    gen = make()
    engine = Engine({"tiny": gen}, {}, max_running=3)
    assert engine.runner_kind("tiny") == "continuous"
    requests = [
        # 30 characters: a GPT with 40 positions has room for 9 tokens after <s> q [SEP], as alone
        ("a long question, thirty chars.", GenerationOptions(max_new_tokens=50)),
        ("hello there", GenerationOptions(max_new_tokens=5)),
        ("a", GenerationOptions(max_new_tokens=12)),
        ("what is up with you", GenerationOptions(max_new_tokens=3)),
        ("zz top", GenerationOptions(max_new_tokens=9)),
        # each row keeps its own sampling options and seeded generator
        ("sampled one", GenerationOptions(max_new_tokens=8, do_sample=True, seed=3, top_k=5, temperature=0.8)),
        ("rep", GenerationOptions(max_new_tokens=10, repetition_penalty=1.5, min_new_tokens=4, do_sample=True,
                                  top_p=0.9, seed=11)),
        ("no repeats", GenerationOptions(max_new_tokens=16, min_new_tokens=16, no_repeat_ngram_size=2)),
        # OpenAI's penalties: each row counts its own reply's tokens
        ("counted", GenerationOptions(max_new_tokens=14, min_new_tokens=14, frequency_penalty=1.5)),
        ("present", GenerationOptions(max_new_tokens=14, min_new_tokens=14, presence_penalty=2.0,
                                      frequency_penalty=-0.5)),
    ]

    async def main():
        return await asyncio.gather(*(_tokens(engine, t, o) for t, o in requests))

    outs = asyncio.run(main())
    for (text, options), got in zip(requests, outs, strict=True):
        assert got == gen.reference(text, options), text
    snap = engine.stats.snapshot()
    assert snap["completed"] == len(requests) and snap["running"] == 0 and snap["waiting"] == 0
    assert snap["max_batch_seen"] == 3  # never above max_running
    # Requests joined a running batch: far fewer decoder steps than decoding one by one.
    alone = sum(len(got) - 1 for got in outs)  # decoding steps one by one (the prefill gives each first token)
    assert snap["steps"] < 0.75 * alone


@pytest.mark.parametrize("where", ["prefill", "step"])
def test_a_row_whose_token_choice_fails_fails_alone_and_its_batch_goes_on(monkeypatch, where):
    """One request's sampling raising (as extreme options once made torch.multinomial do) failed every
    request of the running batch; now only that request fails, and the others get the tokens they get alone."""
    import chatforge.decoding as decoding

    gen = TinyGPTGenerator()
    engine = Engine({"tiny": gen}, {}, max_running=4)
    bad = GenerationOptions(max_new_tokens=6, do_sample=True, seed=666)
    good = [("hello there", GenerationOptions(max_new_tokens=7)),
            ("sampled", GenerationOptions(max_new_tokens=5, do_sample=True, seed=3, top_k=5)),
            ("zz top", GenerationOptions(max_new_tokens=9, repetition_penalty=1.3))]
    expected = [gen.reference(t, o) for t, o in good]
    real, calls = decoding.choose_next, {"n": 0}

    def choose_next(logits, options, generator=None):
        if options.seed == 666:
            calls["n"] += 1
            if where == "prefill" or calls["n"] > 2:  # "step": fails in a decoding step shared with the others
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, options, generator)

    monkeypatch.setattr(decoding, "choose_next", choose_next)

    async def bad_tokens():
        got = []
        with pytest.raises(RuntimeError, match="probability tensor"):
            async for d in engine.stream_reply("boom", bad, "tiny"):
                if isinstance(d, TokenDelta):
                    got.append(d.token_id)
        return got

    async def main():
        return await asyncio.gather(bad_tokens(), *(_tokens(engine, t, o, "tiny") for t, o in good))

    bad_got, *outs = asyncio.run(main())
    assert outs == expected
    assert len(bad_got) == (0 if where == "prefill" else 2)
    snap = engine.stats.snapshot()
    assert snap["failed"] == 1 and snap["completed"] == 3 and snap["running"] == 0
    assert snap["max_batch_seen"] >= 2  # the failing row shared a batch with the others


def test_sequences_join_and_leave_between_steps():
    gate = threading.Semaphore(0)
    gen = GatedGenerator(gate=gate)
    engine = Engine({"g": gen}, {}, max_running=4)

    async def main():
        long = engine.stream_reply("a b", GenerationOptions(max_new_tokens=6))
        short = engine.stream_reply("c", GenerationOptions(max_new_tokens=2))
        async with aclosing(long), aclosing(short):
            assert (await long.__anext__()).token_id == 10  # prefilled alone; its first step waits
            first_short = asyncio.ensure_future(short.__anext__())
            assert await asyncio.to_thread(engine.stats.wait_for, lambda s: s.waiting == 1, WAIT)
            gate.release()  # step 1: only `long` runs; `short` is prefilled right after and joins
            assert (await long.__anext__()).token_id == 11
            assert (await first_short).token_id == 10
            assert engine.stats.max_batch_seen == 1
            gate.release()  # step 2: both rows in one batch
            assert (await long.__anext__()).token_id == 12
            assert (await short.__anext__()).token_id == 11
            assert engine.stats.max_batch_seen == 2
            done = await short.__anext__()  # max_new_tokens=2: it left the batch after that step
            assert isinstance(done, ReplyDone) and done.finish_reason == "length"
            for _ in range(3):
                gate.release()
            rest = [x async for x in long]
        return rest

    rest = asyncio.run(main())
    assert [d.token_id for d in rest[:-1]] == [13, 14, 15]
    assert rest[-1].completion_tokens == 6
    # 5 steps for the long row; the short row rode along in one of them.
    assert gen.step_model.step_calls == 5


def test_cancelled_sequence_leaves_the_batch_within_one_step_and_frees_its_slot():
    gate = threading.Semaphore(0)
    gen = GatedGenerator(gate=gate)
    engine = Engine({"g": gen}, {}, max_running=2, max_queued=0)

    async def main():
        a = engine.stream_reply("a", GenerationOptions(max_new_tokens=500))
        b = engine.stream_reply("b", GenerationOptions(max_new_tokens=500))
        async with aclosing(b):
            await b.__anext__()  # b prefilled; its first step waits for the gate
            first_a = asyncio.ensure_future(a.__anext__())
            assert await asyncio.to_thread(engine.stats.wait_for, lambda s: s.waiting == 1, WAIT)
            gate.release()  # b's step; then a is prefilled and both wait in the next step
            await first_a
            assert engine.stats.wait_for(lambda s: s.running == 2, WAIT)
            await a.aclose()  # the client went away (cancel or deadline): a's flag is set
            calls_at_cancel = gen.step_model.step_calls
            gate.release()  # the step in progress finishes; before the next one, a must be gone
            assert await asyncio.to_thread(
                engine.stats.wait_for, lambda s: s.dropped == 1 and s.running == 1, WAIT)
            assert gen.step_model.step_calls - calls_at_cancel <= 1
            # The freed slot takes a new request (max_queued=0: no queue to hide in).
            got = asyncio.ensure_future(_tokens(engine, "c", GenerationOptions(max_new_tokens=1)))
            gate.release()
            assert await got == [10]
        gate.release(10)

    asyncio.run(main())
    assert engine.dropped >= 1


def test_overload_is_refused_at_once_then_served_again():
    gate = threading.Semaphore(0)
    engine = Engine({"g": GatedGenerator(gate=gate)}, {}, max_running=1, max_queued=1)

    async def main():
        running = engine.stream_reply("a", GenerationOptions(max_new_tokens=2))
        async with aclosing(running):
            await running.__anext__()  # in the batch
            queued = asyncio.ensure_future(_tokens(engine, "b", GenerationOptions(max_new_tokens=1)))
            assert await asyncio.to_thread(engine.stats.wait_for, lambda s: s.waiting == 1, WAIT)
            with pytest.raises(EngineOverloadedError, match=r"overloaded: 1 running and 1 queued"):
                await _tokens(engine, "c", GenerationOptions())
            gate.release()
            rest = [x async for x in running]
            assert rest[-1].finish_reason == "length"
            assert await queued == [10]
        return await _tokens(engine, "d", GenerationOptions(max_new_tokens=1))

    assert asyncio.run(main()) == [10]
    assert engine.rejected == 1


def test_threaded_fallback_for_generators_without_a_step_model():
    engine = Engine({"echo": FakeGenerator()}, {}, max_running=2)
    assert engine.runner_kind("echo") == "threaded"

    async def main():
        return await asyncio.gather(*(_tokens(engine, "hi", GenerationOptions()) for _ in range(5)))

    assert asyncio.run(main()) == [[100, 101, 102, 103]] * 5
    assert engine.completed == 5


class RecordingClassifier(FakeClassifier):
    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def classify(self, texts):
        self.batches.append(len(texts))
        return super().classify(texts)


def test_classify_micro_batches_concurrent_requests():
    clf = RecordingClassifier()
    # A long window: the batch must close because it is full, not because the window ended.
    engine = Engine({}, {"intents": clf}, max_batch_size=8, max_wait_ms=60_000)

    async def main():
        return await asyncio.gather(*(engine.classify([f"bye {i}" if i % 2 else f"hi {i}"]) for i in range(8)))

    preds = asyncio.run(main())
    assert [p[0].label for p in preds] == ["greet", "bye"] * 4
    assert clf.batches == [8]


def test_classify_single_request_waits_at_most_max_wait():
    clf = RecordingClassifier()
    engine = Engine({}, {"intents": clf}, max_batch_size=8, max_wait_ms=1)
    assert asyncio.run(engine.classify(["hello"]))[0].label == "greet"
    assert clf.batches == [1]


def test_classify_overload_and_recovery():
    release = threading.Event()

    class SlowClassifier(FakeClassifier):
        def classify(self, texts):
            assert release.wait(WAIT)
            return super().classify(texts)

    engine = Engine({}, {"slow": SlowClassifier()}, max_batch_size=1, max_wait_ms=0, max_queued=1)

    async def main():
        first = asyncio.ensure_future(engine.classify(["a"]))
        assert await asyncio.to_thread(engine.stats.wait_for, lambda s: s.running == 1, WAIT)
        second = asyncio.ensure_future(engine.classify(["b"]))
        assert await asyncio.to_thread(engine.stats.wait_for, lambda s: s.waiting == 1, WAIT)
        with pytest.raises(EngineOverloadedError, match="overloaded"):
            await engine.classify(["c"])
        release.set()
        await first
        await second
        return await engine.classify(["bye"])

    assert asyncio.run(main())[0].label == "bye"


def test_pipeline_answers_out_of_scope_with_the_fallback():
    from chatforge.serving.engine import PipelineConfig

    class OosClassifier(FakeClassifier):
        def classify(self, texts):
            out = super().classify(texts)
            for t, p in zip(texts, out, strict=True):
                if "weather" in t:
                    p.label = "oos"
            return out

    engine = Engine({"echo": FakeGenerator()}, {"intents": OosClassifier()},
                    pipeline=PipelineConfig("intents", "Sorry, I can only chat.", threshold=0.5))

    async def run(text):
        return [x async for x in engine.stream_reply(text, GenerationOptions())]

    out = asyncio.run(run("what is the weather"))
    assert out[0].text == "Sorry, I can only chat."
    assert out[-1].finish_reason == "fallback" and out[-1].intent == "oos"
    out = asyncio.run(run("hello"))
    assert "".join(d.text for d in out[:-1]) == "Hello there!" and out[-1].intent == "greet"
    with pytest.raises(ValueError, match="threshold"):
        PipelineConfig("intents", "x", threshold=2)
    with pytest.raises(ValueError, match="not hosted"):
        Engine({"echo": FakeGenerator()}, {}, pipeline=PipelineConfig("nope", "x"))


def test_engine_limits_validate():
    with pytest.raises(ValueError, match="max_queued=-1 is out of range"):
        Engine({}, {}, max_queued=-1)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        Engine({}, {}, max_new_tokens=0)
    engine = Engine({"echo": FakeGenerator()}, {}, max_new_tokens=8, max_input_tokens=3)
    from chatforge.serving.engine import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="this server allows at most 8"):
        asyncio.run(_tokens(engine, "hi", GenerationOptions(max_new_tokens=9)))
    with pytest.raises(InvalidRequestError, match="accepts at most 3 input tokens"):
        asyncio.run(_tokens(engine, "a b c d", None))
    assert asyncio.run(_tokens(engine, "a b", None)) == [100, 101, 102, 103]


def test_beam_search_requests_run_beside_the_batch():
    gen = TinySeq2SeqGenerator()
    engine = Engine({"tiny": gen}, {})
    options = GenerationOptions(max_new_tokens=6, num_beams=3)
    got = asyncio.run(_tokens(engine, "hello there", options))
    assert got == gen.reference("hello there", options)
    assert engine.stats.steps == 0  # not through the continuous batcher


def test_loop_sink_wakes_the_loop_once_per_burst_and_keeps_order():
    from chatforge.serving.engine import LoopSink

    loop = asyncio.new_event_loop()
    wakeups = []
    original = loop.call_soon_threadsafe

    def counting(*args):
        wakeups.append(args)
        return original(*args)

    loop.call_soon_threadsafe = counting
    got: list[int] = []
    sink = LoopSink(loop)
    try:
        # A runner thread posts a burst before the loop gets to run: one wake-up carries it all.
        worker = threading.Thread(target=lambda: ([sink.post(got.append, i) for i in range(5)],
                                                  sink.post_many([(got.append, i) for i in range(5, 10)])))
        worker.start()
        worker.join(WAIT)
        assert got == [] and len(wakeups) == 1
        loop.run_until_complete(asyncio.sleep(0))
        assert got == list(range(10))
        assert sink.post(got.append, 10)  # the next burst schedules a new delivery
        loop.run_until_complete(asyncio.sleep(0))
        assert got[-1] == 10 and len(wakeups) == 2
    finally:
        loop.close()
    assert sink.post(got.append, 11) is False  # a closed loop: the runner is told nobody listens
    assert sink.post(got.append, 12) is False


class _CountingSink:
    """Stands in for the engine's LoopSink: records what each hand-over carried."""

    def __init__(self):
        self.handovers: list[list] = []
        self.lock = threading.Lock()

    def post_many(self, calls):
        calls = list(calls)
        with self.lock:
            self.handovers.append([arg for _, arg in calls])
        for fn, arg in calls:
            fn(arg)
        return True


def test_a_decoding_step_is_handed_over_in_one_call_for_all_its_rows():
    from chatforge.serving.batching import ContinuousBatcher, GenRequest, RunnerStats

    gate = threading.Semaphore(0)
    gen = GatedGenerator(gate=gate)
    spec = gen.step_spec()
    runner = ContinuousBatcher("g", spec.model, bos_id=1, eos_id=2, max_running=8, max_queued=8,
                               stats=RunnerStats())
    sink = _CountingSink()
    events: dict[int, list] = {k: [] for k in range(8)}
    done = threading.Semaphore(0)

    def deliver_to(k):
        def deliver(item):
            events[k].append(item)
            if item[0] in ("end", "error"):
                done.release()
        return deliver

    def never(kind, payload):  # with a sink, the batcher must not fall back to per-token emits
        raise AssertionError(f"emit({kind!r}) called although the request has a sink")

    try:
        for k in range(8):
            runner.submit(GenRequest(text="a", prompt_ids=[5], options=GenerationOptions(max_new_tokens=4),
                                     emit=never, sink=sink, deliver=deliver_to(k)))
        gate.release(64)
        for _ in range(8):
            assert done.acquire(timeout=WAIT)
    finally:
        runner.close()
    for k in range(8):
        kinds = [kind for kind, _ in events[k]]
        assert kinds == ["start", "token", "token", "token", "token", "end"], kinds
    steps = [h for h in sink.handovers if any(kind == "token" for kind, _ in h)]
    # 8 rows x 4 tokens: batched steps hand over many rows' tokens at a time, never one call per token.
    assert len(steps) < 32 / 2
    assert max(sum(kind == "token" for kind, _ in h) for h in steps) >= 2


def test_engine_keeps_no_closed_event_loops_alive():
    import gc
    import weakref

    engine = Engine({"echo": FakeGenerator()}, {}, max_running=2)
    refs = []
    for _ in range(3):
        loop = asyncio.new_event_loop()
        sink = engine._sink(loop)
        assert engine._sink(loop) is sink  # one sink per loop, shared by its requests
        refs.append(weakref.ref(loop))
        loop.close()
        del loop, sink
    gc.collect()
    assert all(ref() is None for ref in refs)  # a sink does not pin its loop (nor its engine entry)
    assert len(engine._sinks) == 0
    engine.close()


def test_classify_by_default_runs_a_lone_request_without_waiting_for_partners():
    # The default window is 0: a free model takes what is queued at once (natural batching). Recorded on the
    # batcher's condition: no timed wait for more requests happens (the old 2 ms default waited every time).
    clf = RecordingClassifier()
    engine = Engine({}, {"intents": clf})
    runner = engine._slots()[0].runner
    timed = []
    real_wait = runner._cond.wait

    def wait(timeout=None):
        if timeout is not None:
            timed.append(timeout)
        return real_wait(timeout)

    runner._cond.wait = wait
    assert asyncio.run(engine.classify(["hello"]))[0].label == "greet"
    assert clf.batches == [1] and timed == []


def test_classify_natural_batching_groups_requests_that_arrive_during_a_forward_pass():
    release, started = threading.Event(), threading.Event()

    class GatedRecording(RecordingClassifier):
        def classify(self, texts):
            started.set()
            assert release.wait(WAIT)
            return super().classify(texts)

    clf = GatedRecording()
    engine = Engine({}, {"intents": clf}, max_batch_size=8)

    async def main():
        first = asyncio.ensure_future(engine.classify(["hi 0"]))
        assert await asyncio.to_thread(started.wait, WAIT)
        rest = [asyncio.ensure_future(engine.classify([f"bye {i}"])) for i in range(1, 8)]
        assert await asyncio.to_thread(engine.stats.wait_for, lambda s: s.waiting == 7, WAIT)
        release.set()
        return await asyncio.gather(first, *rest)

    preds = asyncio.run(main())
    assert [p[0].label for p in preds] == ["greet"] + ["bye"] * 7
    assert clf.batches == [1, 7]


# -- torch threads per runner thread (runtime.runner_threads) ------------------------------------------------------
class _ThreadCountingClassifier(FakeClassifier):
    """Records torch's intra-op thread count, as the calling thread sees it, for each batch it classifies."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, int]] = []  # (texts, torch threads)

    def classify(self, texts):
        import torch

        self.seen.append((len(texts), torch.get_num_threads()))
        return super().classify(texts)


def test_a_classifier_batch_gets_every_cpu_and_a_single_text_leaves_one():
    import torch

    from chatforge.serving.batching import ClassifyRequest, MicroBatcher, RunnerStats

    clf = _ThreadCountingClassifier()
    before = torch.get_num_threads()
    runner = MicroBatcher("c", clf, max_batch_size=8, max_queued=8, stats=RunnerStats(), threads=(1, 2))
    try:
        for texts in (["hi"], ["a", "b", "c"], ["bye"]):
            done = threading.Event()
            runner.submit(ClassifyRequest(texts=texts, done=lambda preds, err, d=done: d.set()))
            assert done.wait(WAIT)
    finally:
        runner.close()
        torch.set_num_threads(before)
    assert clf.seen == [(1, 1), (3, 2), (1, 1)]


def test_decoding_runners_use_their_own_thread_count():
    import torch

    from chatforge.serving.batching import ContinuousBatcher, GenRequest, RunnerStats, ThreadedRunner

    class Counting(FakeGenerator):
        def stream(self, text, options):
            seen.append(torch.get_num_threads())
            yield from super().stream(text, options)

    seen: list[int] = []
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1  # a count torch does not have now
    threaded = ThreadedRunner("t", Counting("t"), max_running=2, max_queued=2, stats=RunnerStats(),
                              threads=(want, want))
    gen = GatedGenerator(gate=threading.Semaphore(64))
    spec = gen.step_spec()
    batcher = ContinuousBatcher("g", spec.model, bos_id=1, eos_id=2, max_running=2, max_queued=2,
                                stats=RunnerStats(), threads=(want, want))
    step_threads: list[int] = []
    real_step = spec.model.step

    def counting_step(*a, **k):
        step_threads.append(torch.get_num_threads())
        return real_step(*a, **k)

    spec.model.step = counting_step
    try:
        for runner in (threaded, batcher):
            done = threading.Event()
            runner.submit(GenRequest(text="a", prompt_ids=[5], options=GenerationOptions(max_new_tokens=2),
                                     emit=lambda kind, payload, d=done: d.set() if kind in ("end", "error") else None))
            assert done.wait(WAIT)
    finally:
        threaded.close()
        batcher.close()
        torch.set_num_threads(before)
    assert seen == [want] and step_threads and set(step_threads) == {want}


def test_the_engine_sizes_its_runners_from_runtime(monkeypatch):
    from chatforge import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cpus", lambda *a, **k: 4)
    engine = Engine({}, {"intents": FakeClassifier()}, max_input_chars=200)  # a classifier alone: batches on every CPU
    try:
        assert engine._classifiers["intents"].runner.threads == (3, 4)
    finally:
        engine.close()
    engine = make_engine()  # beside generators: torch's count is process-wide, so every runner keeps the decoding one
    try:
        assert engine._classifiers["intents"].runner.threads == (3, 3)
        assert engine._generators["echo"].runner.threads == (3, 3)
    finally:
        engine.close()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice: runners leave every thread as it is
    engine = make_engine()
    try:
        assert engine._classifiers["intents"].runner.threads is None
    finally:
        engine.close()
