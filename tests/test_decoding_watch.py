"""What a caller shares with the decoding in its context (``watch_decoding``): a ``should_stop`` checked
before every step (beam search included, which sends nothing until it ends) and the step cap it reports;
and how a request's int64 seed reaches torch's generator (``generator_seed``)."""

from __future__ import annotations

import contextvars

import pytest
import torch
from tests.test_decoding import PAD, PlusOneModel, _EchoModel
from tests.test_decoding_beam import _CountingMarkov, scripted

from chatforge.decoding import (
    DecodingStopped,
    GenerationOptions,
    beam_search,
    generate,
    generate_batch,
    generate_stream,
    generator_seed,
    seeded_generator,
    watch_decoding,
)

BOS, EOS = 1, 2


def _stop_after(model, n: int):
    """A should_stop that turns true once ``model`` has taken ``n`` steps."""
    return lambda: model.steps >= n


@pytest.mark.parametrize("num_beams", [1, 4])
def test_should_stop_ends_decoding_within_one_step(num_beams):
    model = _CountingMarkov(scripted(2).table)
    opts = GenerationOptions(max_new_tokens=200, min_new_tokens=200, num_beams=num_beams)
    with watch_decoding(should_stop=_stop_after(model, 3)):
        stream = generate_stream(model, [5], opts, bos_id=BOS, eos_id=EOS)
        with pytest.raises(DecodingStopped, match="before step 4"):
            list(stream)
    assert model.steps == 3
    # Outside the block nothing is watched: the same request runs to its end.
    assert len(generate(model, [5], opts, bos_id=BOS, eos_id=EOS)) == 200


def test_should_stop_reaches_beam_search_and_batches_too():
    model = _CountingMarkov(scripted(2).table)
    opts = GenerationOptions(max_new_tokens=50, min_new_tokens=50, num_beams=3)
    with watch_decoding(should_stop=lambda: True), pytest.raises(DecodingStopped):
        beam_search(model, [5], opts, bos_id=BOS, eos_id=EOS)
    assert model.steps == 0  # checked before the first step too
    with watch_decoding(should_stop=_stop_after(model, 2)), pytest.raises(DecodingStopped):
        generate_batch(model, [[5], [6]], GenerationOptions(max_new_tokens=50, min_new_tokens=50), bos_id=BOS,
                       eos_id=EOS, pad_id=PAD)
    assert model.steps == 2


def test_the_watch_belongs_to_its_context():
    """A stream started in another context (another request's worker) does not see this one's watch."""
    model = _CountingMarkov(scripted(2).table)
    opts = GenerationOptions(max_new_tokens=5, min_new_tokens=5, num_beams=2)
    other = contextvars.copy_context()  # taken before the watch is set
    with watch_decoding(should_stop=lambda: True):
        assert len(other.run(lambda: list(generate_stream(model, [5], opts, bos_id=BOS, eos_id=EOS)))) == 5


@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_watch_reports_the_step_cap_and_tells_length_from_stop(num_beams):
    # max_len caps max_new_tokens: a reply of max_len tokens was cut ("length"), not ended by </s>.
    model = PlusOneModel(flat={9: 5.0})  # never </s>
    model.max_len = 4
    opts = GenerationOptions(max_new_tokens=10, num_beams=num_beams)
    with watch_decoding() as watch:
        out = list(generate_stream(model, [3], opts, bos_id=BOS, eos_id=EOS))
    assert len(out) == 4 and watch.max_steps == 4
    assert watch.finish_reason(len(out), opts.max_new_tokens) == "length"
    # The positions a decoder-only model's state has left cap it too (state.max_steps = 3).
    with watch_decoding() as watch:
        out = list(generate_stream(_EchoModel(), [7, 8, 20], opts, bos_id=BOS, eos_id=EOS))
    assert len(out) == 3 and watch.max_steps == 3 and watch.finish_reason(3, 10) == "length"
    # </s> before the cap: "stop".
    with watch_decoding() as watch:
        out = list(generate_stream(PlusOneModel(), [5, 9], opts, bos_id=BOS, eos_id=EOS))
    assert out == [6, 10] and watch.max_steps == 10 and watch.finish_reason(2, 10) == "stop"
    # No decoding loop reported a cap (a backend of its own): max_new_tokens decides.
    with watch_decoding() as watch:
        pass
    assert watch.max_steps is None and watch.finish_reason(10, 10) == "length" and watch.finish_reason(9, 10) == "stop"


def test_generator_seed_mixes_all_64_bits_reproducibly():
    # SplitMix64's first output from state 0 (Steele et al. 2014's reference), XOR-folded.
    z = 0xE220A8397B1DCDAF
    assert generator_seed(0) == z ^ (z >> 32)
    seeds = [0, 1, -1, 2**32 + 1, 2**63 - 1, -(2**63), 123456789]
    mapped = [generator_seed(s) for s in seeds]
    assert mapped == [generator_seed(s) for s in seeds]  # a function of the seed alone
    assert all(0 <= m < 2**64 for m in mapped)
    assert len({m & 0xFFFFFFFF for m in mapped}) == len(seeds)  # the low 32 bits (all mt19937 keeps) differ
    # Through the generator: seeds equal in their low 32 bits give different streams.
    draws = [torch.randint(0, 2**30, (4,), generator=seeded_generator(s, "cpu")).tolist()
             for s in (1, 2**32 + 1, -1, 2**63 - 1)]
    assert len({tuple(d) for d in draws}) == 4
