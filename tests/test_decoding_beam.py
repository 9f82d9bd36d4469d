"""Beam search: exact on a scripted Markov model (checked against exhaustive search), finds what
greedy misses, length penalty, option validation, and cached == uncached on a real GPT."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from chatforge.decoding import GenerationOptions, beam_search, generate, generate_batch, generate_stream
from chatforge.models.gpt import GPTConfig, GPTLMHeadModel
from chatforge.registry import SpecialIds

EOS = 2


class MarkovState:
    def __init__(self, b: int):
        self.rows = torch.zeros(b)
        self.started = False

    def reorder(self, index: torch.Tensor) -> None:
        self.rows = self.rows.index_select(0, index)


class MarkovModel:
    """Next-token log-probs depend only on the previous token: table[prev + 1] (row 0 = start)."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # (V + 1, V) log-probabilities

    def init_state(self, input_ids, use_cache=True):
        return MarkovState(input_ids.size(0))

    def decode_step(self, tokens, state):
        assert tokens.shape == (state.rows.size(0), 1)
        if not state.started:  # the first fed token is <s>: read the start row
            state.started = True
            return self.table[0].expand(tokens.size(0), -1).clone()
        return self.table[tokens[:, 0] + 1]

    def parameters(self):
        return iter(())


def scripted(seed: int, vocab: int = 5) -> MarkovModel:
    g = torch.Generator().manual_seed(seed)
    return MarkovModel(torch.randn(vocab + 1, vocab, generator=g).mul(2).log_softmax(-1))


def exhaustive(model: MarkovModel, max_len: int, lp: float) -> tuple[float, list[int]]:
    """Best sum(log p)/len**lp over all sequences that end in </s> or stop at max_len."""
    vocab = model.table.size(1)
    best = (-math.inf, [])
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if EOS in seq[:-1] or (n < max_len and seq[-1] != EOS):
                continue
            prev, score = -1, 0.0
            for i, t in enumerate(seq):
                # The first step reads row 0; later steps read the row of the previous token.
                score += float(model.table[0 if i == 0 else prev + 1, t])
                prev = t
            cand = (score / n**lp, list(seq[:-1]) if seq[-1] == EOS else list(seq))
            best = max(best, cand, key=lambda c: c[0])
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lp", [0.0, 1.0])
def test_wide_beam_is_exact(seed, lp):
    model = scripted(seed)
    opts = GenerationOptions(max_new_tokens=4, num_beams=16, length_penalty=lp)
    got = beam_search(model, [5], opts, bos_id=1, eos_id=EOS)
    assert got == exhaustive(model, 4, lp)[1]


def test_beam_finds_what_greedy_misses():
    # Step 1: token 3 (p=.5) vs 4 (p=.4); after 3 everything is flat, after 4 </s> is certain.
    t = torch.full((6, 5), 1e-9)
    t[0, 3], t[0, 4], t[0, 0] = 0.5, 0.4, 0.1
    t[4, :] = 0.2  # after 3: uniform
    t[5, EOS] = 1.0  # after 4: </s>
    t[1:4, EOS] = 1.0
    model = MarkovModel((t / t.sum(-1, keepdim=True)).log())
    greedy = generate(model, [7], GenerationOptions(max_new_tokens=2), bos_id=1, eos_id=EOS)
    beam = generate(model, [7], GenerationOptions(max_new_tokens=2, num_beams=2, length_penalty=0.0),
                    bos_id=1, eos_id=EOS)
    assert greedy[0] == 3 and beam == [4]


def test_length_penalty_prefers_longer():
    model = scripted(3)
    short = beam_search(model, [5], GenerationOptions(max_new_tokens=4, num_beams=16, length_penalty=-2.0),
                        bos_id=1, eos_id=EOS)
    long = beam_search(model, [5], GenerationOptions(max_new_tokens=4, num_beams=16, length_penalty=4.0),
                       bos_id=1, eos_id=EOS)
    assert len(long) >= len(short)


def test_options_validation():
    for bad, field in ((dict(num_beams=0), "num_beams"), (dict(num_beams=17), "num_beams"),
                       (dict(length_penalty=9.0), "length_penalty"), (dict(num_beams=2, do_sample=True), "num_beams")):
        with pytest.raises(ValueError, match=field):
            GenerationOptions(**bad).validate()
    with pytest.raises(ValueError, match="num_beams"):
        generate_stream(scripted(0), [5], GenerationOptions(num_beams=2, do_sample=True), bos_id=1, eos_id=EOS)


def test_gpt_beam_cached_equals_uncached_and_min_length():
    torch.manual_seed(0)
    cfg = GPTConfig(d_model=32, n_heads=2, n_layers=2, n_positions=64, dropout=0.0, attn_dropout=0.0, init_std=0.3)
    model = GPTLMHeadModel(cfg, 40, SpecialIds(cls=4, sep=5), "generation").eval()
    opts = GenerationOptions(max_new_tokens=10, num_beams=4, min_new_tokens=6, repetition_penalty=1.3)
    a = generate(model, [7, 8, 9], opts, bos_id=1, eos_id=EOS)
    b = generate(model, [7, 8, 9], opts, bos_id=1, eos_id=EOS, use_cache=False)
    assert a == b and len(a) >= 6
    assert generate_batch(model, [[7, 8, 9], [10]], opts, bos_id=1, eos_id=EOS, pad_id=0)[0] == a


def test_gpt_beam_applies_openais_count_penalties_to_each_beam():
    """Beam search reads each hypothesis' own token counts: a frequency penalty breaks the plain beam's run of
    one token, cached and uncached agree, and a batched row equals the same prompt alone."""
    torch.manual_seed(0)
    cfg = GPTConfig(d_model=32, n_heads=2, n_layers=2, n_positions=64, dropout=0.0, attn_dropout=0.0, init_std=0.3)
    model = GPTLMHeadModel(cfg, 40, SpecialIds(cls=4, sep=5), "generation").eval()
    plain = generate(model, [7, 8, 9], GenerationOptions(max_new_tokens=10, num_beams=4, min_new_tokens=6),
                     bos_id=1, eos_id=EOS)
    most = max(plain.count(t) for t in plain)
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0, "frequency_penalty": 0.5}):
        opts = GenerationOptions(max_new_tokens=10, num_beams=4, min_new_tokens=6, **kw)
        a = generate(model, [7, 8, 9], opts, bos_id=1, eos_id=EOS)
        assert a == generate(model, [7, 8, 9], opts, bos_id=1, eos_id=EOS, use_cache=False)
        assert generate_batch(model, [[7, 8, 9], [10]], opts, bos_id=1, eos_id=EOS, pad_id=0)[0] == a
        assert a != plain and max(a.count(t) for t in a) < most, (a, plain)


class _CountingMarkov(MarkovModel):
    """A MarkovModel that counts its decoding steps (also used by tests/test_decoding_watch.py)."""

    def __init__(self, table):
        super().__init__(table)
        self.steps = 0

    def decode_step(self, tokens, state):
        self.steps += 1
        return super().decode_step(tokens, state)


def test_a_beam_stream_starts_its_search_at_the_first_next():
    """``generate_stream`` ran the whole search at the call, before its consumer could stop it (or set up what
    decoding reads from the consumer's context: its ``should_stop``); bad input still fails at the call."""
    model = _CountingMarkov(scripted(1).table)
    opts = GenerationOptions(max_new_tokens=6, min_new_tokens=6, num_beams=3)
    stream = generate_stream(model, [5], opts, bos_id=1, eos_id=EOS)
    assert model.steps == 0
    assert list(stream) == beam_search(scripted(1), [5], opts, bos_id=1, eos_id=EOS)
    assert model.steps == 6
    with pytest.raises(ValueError, match="input sequence 0 is empty"):
        generate_stream(model, [], opts, bos_id=1, eos_id=EOS)
