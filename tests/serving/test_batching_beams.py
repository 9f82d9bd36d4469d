"""Beam search and the model's position cap in the runners: a cancelled (or expired) beam request stops
within one decoding step and frees its worker; a reply cut by the model's positions ends with "length" on
every path; a seed's high bits matter in the continuous batch too. No grpc.

Found by a hostile client: 72 x ``Reply(num_beams=16, max_new_tokens=1024, min_new_tokens=1024,
timeout=0.2)`` all got DEADLINE_EXCEEDED, yet their searches ran on for ~10 s (new requests got
RESOURCE_EXHAUSTED); ``num_beams=2, max_new_tokens=600`` on a model with 512 positions ended "stop".
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest
from tests.serving_fakes import WAIT, ServerThread, TinyGPTGenerator, TinySeq2SeqGenerator, _TagDetok

from chatforge.decoding import GenerationOptions, StepSpec, generate_stream
from chatforge.inference import TokenDelta
from chatforge.models.transformer import Seq2SeqStepModel
from chatforge.serving.engine import Engine, ReplyDone
from chatforge.serving.metrics import ServingMetrics
from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc as pb_grpc


class _GatedModel:
    """A real decoding model whose ``block_at``-th decoding step waits until the test sets ``proceed``."""

    def __init__(self, inner, block_at: int):
        self.inner, self.block_at = inner, block_at
        self.calls = 0
        self.reached, self.proceed = threading.Event(), threading.Event()

    def __getattr__(self, name):  # init_state, parameters, max_len, training: the real model's
        return getattr(self.inner, name)

    def decode_step(self, tokens, state):
        self.calls += 1
        if self.calls == self.block_at:
            self.reached.set()
            if not self.proceed.wait(WAIT):
                raise RuntimeError("the test never let this step finish")
        return self.inner.decode_step(tokens, state)


class _LazyGenerator(TinySeq2SeqGenerator):
    """Streams through ``decoding.generate_stream`` as ``inference.Seq2SeqGenerator`` does (lazily, one
    ``next`` per token), over a model whose ``block_at``-th step is gated; continuous batching keeps the
    real model."""

    def __init__(self, block_at: int, **kw):
        super().__init__(**kw)
        self.real = self.model
        self.gated = _GatedModel(self.real, block_at)

    def stream(self, text: str, options: GenerationOptions) -> Iterator[TokenDelta]:
        for t in generate_stream(self.gated, self.encode(text), options, bos_id=1, eos_id=2):
            yield TokenDelta(token_id=t, text=f"<{t}>")

    def step_spec(self):
        return StepSpec(model=Seq2SeqStepModel(self.real), encode=self.encode, new_detokenizer=_TagDetok,
                        bos_id=1, eos_id=2, unk_id=3)


async def _reply(engine, text, options):
    tokens, done = [], None
    async for item in engine.stream_reply(text, options):
        if isinstance(item, TokenDelta):
            tokens.append(item.token_id)
        else:
            assert isinstance(item, ReplyDone)
            done = item
    return tokens, done


def test_a_cancelled_beam_search_stops_within_one_step_and_frees_its_worker():
    """The beam search ran to its end after its consumer went away (the runner only checked between
    tokens, and a beam search sends its tokens only at the end): its worker stayed busy."""
    gen = _LazyGenerator(block_at=3)
    engine = Engine({"tiny": gen}, {}, max_running=1, max_queued=0)
    beams = GenerationOptions(num_beams=4, max_new_tokens=60, min_new_tokens=60)

    async def main():
        task = asyncio.ensure_future(_reply(engine, "hello there", beams))
        assert await asyncio.to_thread(gen.gated.reached.wait, WAIT)  # the search is in its 3rd step
        assert engine.stats.running == 1
        task.cancel()  # the consumer goes away (client cancel or deadline)
        with pytest.raises(asyncio.CancelledError):
            await task
        gen.gated.proceed.set()  # the step in flight finishes; the search must not take another
        assert await asyncio.to_thread(engine.stats.wait_for, lambda s: s.running == 0, WAIT)
        assert gen.gated.calls == 3, f"{gen.gated.calls - 3} decoding steps after the cancel"
        # The worker is free for the next beam request (max_queued=0: no queue to hide in).
        return await _reply(engine, "hi", GenerationOptions(num_beams=2, max_new_tokens=3))

    tokens, done = asyncio.run(main())
    assert len(tokens) == 3 and done.finish_reason == "length"
    snap = engine.stats.snapshot()
    assert snap["dropped"] == 1 and snap["failed"] == 0 and snap["running"] == 0


def test_an_uncancelled_lazy_beam_search_gives_what_decoding_alone_gives():
    gen = _LazyGenerator(block_at=0)  # never gated
    engine = Engine({"tiny": gen}, {})
    options = GenerationOptions(num_beams=3, max_new_tokens=12, length_penalty=0.5)
    tokens, done = asyncio.run(_reply(engine, "hello there", options))
    assert tokens == gen.reference("hello there", options)
    assert done.finish_reason == ("length" if len(tokens) == 12 else "stop")


PATHS = {
    "greedy": {},
    "sampling": {"do_sample": True, "seed": 5, "top_k": 8},
    "beams": {"num_beams": 2},
}


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "threaded"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("make", [lambda: TinySeq2SeqGenerator(max_len=8), lambda: TinyGPTGenerator(n_positions=24)],
                         ids=["transformer-max_len-8", "gpt-24-positions"])
def test_a_reply_cut_by_the_models_positions_ends_with_length_on_every_path(make, path, continuous):
    """``max_new_tokens=600`` on a model with 512 positions: 512 tokens, and "stop" from beam search (and from
    every request of the per-request runner), which compared the count with max_new_tokens."""
    gen = make()
    engine = Engine({"m": gen}, {}, continuous_batching=continuous)
    options = GenerationOptions(max_new_tokens=30, min_new_tokens=30, **PATHS[path])  # no </s>: cut by the cap
    tokens, done = asyncio.run(_reply(engine, "hi there", options))
    assert tokens == gen.reference("hi there", options)
    assert 0 < len(tokens) < 30  # the model's positions cut it, not max_new_tokens
    assert done.finish_reason == "length"


def test_seeds_that_differ_only_in_their_high_bits_sample_different_replies_in_the_batch():
    """torch's CPU generator keeps the low 32 bits of its seed: seeds 1 and 2**32 + 1 gave the same reply."""
    gen = TinySeq2SeqGenerator()
    engine = Engine({"tiny": gen}, {})
    assert engine.runner_kind("tiny") == "continuous"

    def opts(seed):
        return GenerationOptions(do_sample=True, temperature=2.0, seed=seed, max_new_tokens=20, min_new_tokens=20)

    async def main():
        return await asyncio.gather(*(_reply(engine, "sample me", opts(s)) for s in (1, 2**32 + 1, 1)))

    (a, _), (b, _), (again, _) = asyncio.run(main())
    assert a == again == gen.reference("sample me", opts(1))
    assert b == gen.reference("sample me", opts(2**32 + 1))
    assert a != b


def test_over_grpc_a_cancelled_beam_reply_frees_its_worker_for_the_next_call():
    """The hostile client's view: after its beam calls ended, the server refused new calls
    (RESOURCE_EXHAUSTED) while their searches ran on, and ``requests_running`` (per call) said 0.
    Now the search ends with its call, so the gauge and the workers agree. (A deadline ends the call the
    way a cancel does: the servicer's stream is closed and the request's ``cancelled`` is set.)"""
    gen = _LazyGenerator(block_at=2)
    engine = Engine({"tiny": gen}, {}, max_running=1, max_queued=0)
    metrics = ServingMetrics(process_metrics=False)
    running = {"model": "tiny"}
    beams = pb.GenerationOptions(num_beams=16, max_new_tokens=60, min_new_tokens=60)
    with ServerThread(engine, metrics=metrics) as st, grpc.insecure_channel(st.target) as channel:
        st.wait_serving()
        stub = pb_grpc.ChatbotStub(channel)
        call = stub.Reply(pb.ReplyRequest(text="hello", options=beams), timeout=WAIT)
        assert gen.gated.reached.wait(WAIT)  # in its 2nd step
        assert metrics.value("chatforge_requests_running", running) == 1
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert engine.stats.wait_for(lambda s: s.abandoned == 1, WAIT)  # the server saw the call end
        gen.gated.proceed.set()
        assert engine.stats.wait_for(lambda s: s.running == 0, WAIT)
        assert gen.gated.calls == 2
        # max_running=1, max_queued=0: refused (RESOURCE_EXHAUSTED) if the search still held the worker.
        short = pb.GenerationOptions(num_beams=16, max_new_tokens=2)
        assert len([m for m in stub.Reply(pb.ReplyRequest(text="hi", options=short), timeout=WAIT)
                    if m.HasField("delta")]) == 2
