"""Decoding: pure filtering helpers on hand-made tensors, the loop on a scripted fake model,
and cached == uncached / batched == single on a tiny real Transformer."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from chatforge.decoding import (
    GenerationOptions,
    apply_count_penalties,
    apply_penalties,
    apply_repetition_penalty,
    banned_ngram_tokens,
    block_repeated_ngrams,
    choose_next,
    generate,
    generate_batch,
    generate_stream,
    top_k_top_p_filter,
)
from chatforge.models.transformer import TransformerConfig, TransformerSeq2Seq

NEG = float("-inf")
PAD, BOS, EOS = 0, 1, 2



# ---- pure helpers ----


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0], [0.5, 0.125, 0.25, 0.0]])
    out = top_k_top_p_filter(logits, top_k=2)
    assert out.tolist() == [[NEG, 4.0, NEG, 3.0], [0.5, NEG, 0.25, NEG]]
    assert logits[0, 0] == 1.0  # input untouched
    torch.testing.assert_close(top_k_top_p_filter(logits, top_k=10), logits)  # k >= V: no-op


def test_top_k_keeps_ties_with_kth():
    out = top_k_top_p_filter(torch.tensor([3.0, 2.0, 2.0, 1.0]), top_k=2)
    assert out.tolist() == [3.0, 2.0, 2.0, NEG]


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_k_top_p_filter(logits, top_p=p))[0].tolist()  # noqa: E731
    assert keep(0.7) == [False, True, False, True]  # 0.5 < 0.7, 0.5+0.3 >= 0.7
    assert keep(0.5) == [False, True, False, False]  # the top token alone reaches 0.5
    assert keep(0.81) == [True, True, False, True]
    assert keep(0.01) == [False, True, False, False]  # always at least one token
    assert keep(1.0) == [True, True, True, True]
    # Kept logits are unchanged.
    assert top_k_top_p_filter(logits, top_p=0.7)[0, 1].item() == pytest.approx(math.log(0.5))


def test_top_k_then_top_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top-k=3 renormalises to (0.444, 0.333, 0.222); p=0.7 keeps the first two.
    assert torch.isfinite(top_k_top_p_filter(logits, top_k=3, top_p=0.7)).tolist() == [True, True, False, False]


def test_filter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_p"):
        top_k_top_p_filter(torch.zeros(3), top_p=0.0)


def test_repetition_penalty_ctrl_style():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 3.0, -4.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_choose_next_greedy_and_sampling_with_top_k_one():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.1]])
    assert choose_next(logits, GenerationOptions()).tolist() == [1, 0]
    opts = GenerationOptions(do_sample=True, top_k=1, temperature=3.0)
    assert choose_next(logits, opts, torch.Generator().manual_seed(1)).tolist() == [1, 0]


# ---- the loop, on a scripted fake model ----


class _State:
    def __init__(self, rows: torch.Tensor):
        self.rows = rows
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        self.rows = self.rows.index_select(0, index)


class PlusOneModel:
    """Emits each source token + 1, then </s>; records what decoding asked of it."""

    vocab = 32

    def __init__(self, eos_first: bool = False, flat: dict[int, float] | None = None):
        self.eos_first = eos_first  # always prefer </s> (second choice: token 7)
        self.flat = flat  # fixed logits, ignoring the source
        self.batch_sizes: list[int] = []
        self.fed: list[list[int]] = []
        self.inference_mode: list[bool] = []
        self.training = False

    def init_state(self, input_ids: torch.Tensor, use_cache: bool = True) -> _State:
        return _State(input_ids)

    def decode_step(self, tokens: torch.Tensor, state: _State) -> torch.Tensor:
        self.batch_sizes.append(tokens.size(0))
        self.fed.append(tokens[:, 0].tolist())
        self.inference_mode.append(torch.is_inference_mode_enabled())
        logits = torch.zeros(tokens.size(0), self.vocab)
        for r, row in enumerate(state.rows.tolist()):
            if self.flat is not None:
                for tok, val in self.flat.items():
                    logits[r, tok] = val
                continue
            if self.eos_first:
                logits[r, EOS], logits[r, 7] = 5.0, 4.0
                continue
            real = [t for t in row if t != PAD]
            logits[r, real[state.length] + 1 if state.length < len(real) else EOS] = 5.0
        state.length += 1
        return logits


def test_stops_at_eos_and_excludes_it():
    model = PlusOneModel()
    assert generate(model, [5, 9, 11], GenerationOptions(), bos_id=BOS, eos_id=EOS) == [6, 10, 12]
    assert model.fed == [[BOS], [6], [10], [12]]  # </s> produced at step 4, never fed back


def test_max_new_tokens_limits_output():
    out = generate(PlusOneModel(), [5, 9, 11, 13], GenerationOptions(max_new_tokens=2), bos_id=BOS, eos_id=EOS)
    assert out == [6, 10]


def test_min_new_tokens_suppresses_eos():
    opts = GenerationOptions(min_new_tokens=3, max_new_tokens=10)
    assert generate(PlusOneModel(eos_first=True), [5], opts, bos_id=BOS, eos_id=EOS) == [7, 7, 7]
    assert generate(PlusOneModel(eos_first=True), [5], GenerationOptions(), bos_id=BOS, eos_id=EOS) == []


def test_count_penalties_follow_openais_formula():
    """logits[j] - counts[j] * frequency_penalty - (counts[j] > 0) * presence_penalty (OpenAI's API reference,
    "Parameter details"), per row."""
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 1.0]])
    expected = logits - counts * 0.5 - (counts > 0).float() * 1.0
    assert apply_count_penalties(logits, counts, 0.5, 1.0).tolist() == expected.tolist()
    assert expected.tolist() == [[1.0, 0.5, 1.0, 4.0], [-1.5, 2.0, 3.0, 2.5]]
    assert apply_count_penalties(logits, counts, -1.0, 0.0).tolist() == [[1.0, 3.0, 5.0, 4.0], [4.0, 2.0, 3.0, 5.0]]
    assert apply_count_penalties(logits, counts, 0.0, 0.0) is logits
    # with CTRL's penalty: the repetition penalty first (on seen tokens), then the additive ones
    opts = GenerationOptions(repetition_penalty=2.0, frequency_penalty=0.5)
    assert apply_penalties(logits, counts, opts).tolist() == [[1.0, 0.5, 0.5, 4.0], [-1.0, 2.0, 3.0, 1.5]]


@pytest.mark.parametrize("bad", [dict(frequency_penalty=2.5), dict(presence_penalty=-3.0)])
def test_count_penalties_out_of_range_are_refused_naming_the_range(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=rf"{name}=.* allowed: a number in \[-2, 2\]"):
        GenerationOptions(**bad).validate()


def test_frequency_and_presence_penalties_in_loop():
    flat = {5: 1.0, 6: 0.9}
    run = lambda **kw: generate(PlusOneModel(flat=flat), [3], GenerationOptions(max_new_tokens=4, **kw),  # noqa: E731
                                bos_id=BOS, eos_id=EOS)
    assert run() == [5, 5, 5, 5]
    # frequency 0.06: 5 scores 1.0, 0.94, 0.88 (< 6's 0.9) -> 6, then 0.88 > 0.84 -> 5
    assert run(frequency_penalty=0.06) == [5, 5, 6, 5]
    # presence 0.2: once seen, 5 scores 0.8 < 0.9 -> 6; then 6 scores 0.7 -> 5, and both stay seen
    assert run(presence_penalty=0.2) == [5, 6, 5, 5]
    assert run(frequency_penalty=-1.0) == [5, 5, 5, 5]  # negative: repeats favoured


def test_repetition_penalty_in_loop():
    flat = {5: 1.0, 6: 0.9}
    opts = GenerationOptions(max_new_tokens=3)
    assert generate(PlusOneModel(flat=flat), [3], opts, bos_id=BOS, eos_id=EOS) == [5, 5, 5]
    opts.repetition_penalty = 2.0  # step 2: 5 -> 0.5 < 0.9; step 3: 5 -> 0.5 > 6 -> 0.45
    assert generate(PlusOneModel(flat=flat), [3], opts, bos_id=BOS, eos_id=EOS) == [5, 6, 5]


def test_stream_is_lazy_one_step_per_token():
    model = PlusOneModel()
    stream = generate_stream(model, [5, 9, 11], GenerationOptions(), bos_id=BOS, eos_id=EOS)
    assert model.batch_sizes == []
    assert next(stream) == 6
    assert len(model.batch_sizes) == 1
    assert next(stream) == 10
    assert len(model.batch_sizes) == 2


def test_inference_mode_per_step_never_leaks_across_threads():
    model = PlusOneModel()
    stream = generate_stream(model, [5, 9, 11, 13], GenerationOptions(), bos_id=BOS, eos_id=EOS)
    with ThreadPoolExecutor(max_workers=2) as pool:
        # Resume the same generator from different threads, as an engine's executor may.
        got = [pool.submit(next, stream).result() for _ in range(4)]
        leaked = pool.submit(torch.is_inference_mode_enabled).result()
    assert got == [6, 10, 12, 14]
    assert all(model.inference_mode)
    assert not torch.is_inference_mode_enabled() and not leaked


def test_bad_input_fails_at_the_call():
    with pytest.raises(ValueError, match="top_p"):
        generate_stream(PlusOneModel(), [5], GenerationOptions(top_p=0.0), bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="empty"):
        generate_stream(PlusOneModel(), [], GenerationOptions(), bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="input sequence 1 is empty"):
        generate_batch(PlusOneModel(), [[5], []], GenerationOptions(), bos_id=BOS, eos_id=EOS, pad_id=PAD)


def test_batch_drops_finished_rows():
    model = PlusOneModel()
    out = generate_batch(model, [[5], [7, 8, 9], [11, 12]], GenerationOptions(), bos_id=BOS, eos_id=EOS,
                         pad_id=PAD)
    assert out == [[6], [8, 9, 10], [12, 13]]
    assert model.batch_sizes == [3, 3, 2, 1]


def test_max_new_tokens_capped_by_model_max_len():
    model = PlusOneModel()
    model.max_len = 2
    assert generate(model, [5, 9, 11, 13], GenerationOptions(max_new_tokens=10), bos_id=BOS, eos_id=EOS) == [6, 10]


# ---- a tiny real Transformer ----


@pytest.fixture(scope="module")
def model() -> TransformerSeq2Seq:
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, n_heads=2, num_encoder_layers=2, num_decoder_layers=2, d_ff=64,
                            dropout=0.0, max_len=64, tie_embeddings=False)
    return TransformerSeq2Seq(cfg, vocab_size=40, pad_id=PAD).eval()


SOURCES = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [20]]


@pytest.mark.parametrize("penalty", [{}, {"repetition_penalty": 1.5},
                                     {"frequency_penalty": 1.2, "presence_penalty": 0.4}])
def test_cached_equals_uncached(model, penalty):
    opts = GenerationOptions(max_new_tokens=15, **penalty)
    outs = []
    for src in SOURCES:
        cached = generate(model, src, opts, bos_id=BOS, eos_id=EOS)
        assert cached == generate(model, src, opts, bos_id=BOS, eos_id=EOS, use_cache=False)
        outs.append(cached)
        # Step logits along the same token path agree too.
        ids = torch.tensor([src])
        with torch.inference_mode():
            s1, s2 = model.init_state(ids), model.init_state(ids, use_cache=False)
            for tok in [BOS, *cached]:
                t = torch.tensor([[tok]])
                torch.testing.assert_close(model.decode_step(t, s1), model.decode_step(t, s2), atol=1e-5, rtol=1e-5)
    # Non-trivial: every source decodes differently and many tokens occur.
    assert len({tuple(o) for o in outs}) == len(SOURCES)
    assert len({t for o in outs for t in o}) >= 5


def test_batched_equals_single_greedy(model):
    opts = GenerationOptions(max_new_tokens=12)
    single = [generate(model, s, opts, bos_id=BOS, eos_id=EOS) for s in SOURCES]
    assert generate_batch(model, SOURCES, opts, bos_id=BOS, eos_id=EOS, pad_id=PAD) == single
    assert generate_batch(model, SOURCES, opts, bos_id=BOS, eos_id=EOS, pad_id=PAD, use_cache=False) == single


def test_seeded_sampling_is_reproducible(model):
    def sample(seed):
        opts = GenerationOptions(do_sample=True, temperature=2.0, top_k=20, top_p=0.95, seed=seed,
                                 min_new_tokens=20, max_new_tokens=20)
        return generate(model, [5, 6, 7], opts, bos_id=BOS, eos_id=EOS)

    a = sample(123)
    assert len(a) == 20
    assert a == sample(123)
    assert a != sample(124)
    opts = GenerationOptions(do_sample=True, temperature=2.0, seed=7, max_new_tokens=10)
    b1 = generate_batch(model, SOURCES, opts, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert b1 == generate_batch(model, SOURCES, opts, bos_id=BOS, eos_id=EOS, pad_id=PAD)


@pytest.mark.parametrize(("a", "b"), [(1, 2**32 + 1), (-1, 2**63 - 1), (0, -(2**63)), (7, 7 + (1 << 40))])
def test_seeds_that_differ_only_in_their_high_bits_sample_different_replies(model, a, b):
    """The proto's seed is an int64, but torch's CPU generator keeps only the low 32 bits of its seed:
    1 and 2**32 + 1 (or -1 and 2**63 - 1) sampled the same reply."""

    def sample(seed):
        opts = GenerationOptions(do_sample=True, temperature=2.0, seed=seed, min_new_tokens=20, max_new_tokens=20)
        return generate(model, [5, 6, 7], opts, bos_id=BOS, eos_id=EOS)

    assert sample(a) == sample(a) and sample(b) == sample(b)
    assert sample(a) != sample(b)


# ---- decoder-only hooks: start_tokens and max_steps on the state ----


class _PromptState:
    def __init__(self, src):
        self.start_tokens = src[:, -1:]  # decoding feeds the prompt's last token first, not <s>
        self.max_steps = 3  # positions left
        self.fed: list[list[int]] = []

    def reorder(self, index):
        self.start_tokens = self.start_tokens.index_select(0, index)


class _EchoModel:
    """Returns logits that pick (fed token + 1): the output reveals what was fed first."""

    def init_state(self, src, use_cache=True):
        self.state = _PromptState(src)
        return self.state

    def decode_step(self, tokens, state):
        state.fed.append(tokens[:, 0].tolist())
        return torch.nn.functional.one_hot(tokens[:, 0] + 1, 40).float()

    def parameters(self):
        return iter(())


def test_decoder_only_hooks_start_tokens_and_max_steps():
    model = _EchoModel()
    out = generate(model, [7, 8, 20], GenerationOptions(max_new_tokens=10), bos_id=BOS, eos_id=EOS)
    assert out == [21, 22, 23]  # fed 20 (the prompt's last token) first; capped at 3 steps
    assert model.state.fed == [[20], [21], [22]]


def test_a_tiny_temperature_samples_the_argmax_instead_of_nan():
    # temperature is valid in (0, 10]: 1e-30 (and float32's smallest, 1e-45) must not overflow to NaN.
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 5
    for t in (1e-30, 1e-38, 1e-45):
        picked = choose_next(logits, GenerationOptions(do_sample=True, temperature=t))
        assert picked.tolist() == logits.argmax(-1).tolist()


# ---- no_repeat_ngram_size ----


def _ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def test_banned_ngram_tokens_are_the_continuations_of_the_last_n_minus_1_tokens():
    assert banned_ngram_tokens([5, 6, 7, 5], 2) == [6]  # "5 6" exists: 6 may not follow 5 again
    assert banned_ngram_tokens([5, 6, 5, 7, 5], 2) == [6, 7]
    assert banned_ngram_tokens([5, 6, 7, 5, 6], 3) == [7]
    assert banned_ngram_tokens([5, 6], 3) == []  # nothing complete yet
    assert sorted(banned_ngram_tokens([4, 4, 9], 1)) == [4, 9]
    assert banned_ngram_tokens([5, 6, 5], 0) == []


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_block_repeated_ngrams_matches_hugging_face_no_repeat_ngram_processor(n):
    """Parity with transformers' NoRepeatNGramLogitsProcessor on random histories (rows of one length,
    as its input_ids are)."""
    processor_mod = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(n)
    histories = torch.randint(0, 3, (8, 30), generator=g)  # a small vocabulary: many repeats
    scores = torch.randn(8, 10, generator=g)
    want = processor_mod.NoRepeatNGramLogitsProcessor(n)(histories, scores.clone())
    got = block_repeated_ngrams(scores.clone(), histories.tolist(), n)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got).any()
    torch.testing.assert_close(got[~torch.isinf(got)], scores[~torch.isinf(got)])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_size_keeps_every_ngram_of_a_reply_unique(model, num_beams):
    looping = [generate(model, s, GenerationOptions(max_new_tokens=30, min_new_tokens=30, num_beams=num_beams),
                        bos_id=BOS, eos_id=EOS) for s in SOURCES]
    assert any(len(set(_ngrams(o, 2))) < len(_ngrams(o, 2)) for o in looping)  # the option has work to do
    for n in (2, 3):
        opts = GenerationOptions(max_new_tokens=30, min_new_tokens=30, num_beams=num_beams, no_repeat_ngram_size=n)
        for src in SOURCES:
            out = generate(model, src, opts, bos_id=BOS, eos_id=EOS)
            assert len(out) == 30 and len(set(_ngrams(out, n))) == len(_ngrams(out, n)), (n, out)
    if num_beams == 1:  # batched rows keep their own histories, also when rows leave the batch
        opts = GenerationOptions(max_new_tokens=20, no_repeat_ngram_size=2)
        single = [generate(model, s, opts, bos_id=BOS, eos_id=EOS) for s in SOURCES]
        assert generate_batch(model, SOURCES, opts, bos_id=BOS, eos_id=EOS, pad_id=PAD) == single
