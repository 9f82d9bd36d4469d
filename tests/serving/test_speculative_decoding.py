"""Speculative greedy decoding in the continuous batcher (``chatforge.drafts``): rows draft from a trie of
stored replies, the model verifies every draft in one step, and each request gets exactly the tokens it
gets decoding alone, in fewer steps where the drafts are right; rows that sample, penalise or ban n-grams
are never drafted but share the batch."""

from __future__ import annotations

import asyncio

import pytest
from tests.serving.test_batching import _tokens
from tests.serving_fakes import TinyGPTGenerator, TinySeq2SeqGenerator

from chatforge.decoding import GenerationOptions
from chatforge.drafts import DraftIndex
from chatforge.serving.engine import Engine

GREEDY = [
    ("a long question, thirty chars.", GenerationOptions(max_new_tokens=50)),  # runs out of positions
    ("hello there", GenerationOptions(max_new_tokens=20)),
    ("a", GenerationOptions(max_new_tokens=12)),
    ("what is up with you", GenerationOptions(max_new_tokens=7)),
    ("zz top", GenerationOptions(max_new_tokens=16, min_new_tokens=3)),
    ("unrelated", GenerationOptions(max_new_tokens=10)),
]
OTHERS = [
    ("sampled one", GenerationOptions(max_new_tokens=8, do_sample=True, seed=3, top_k=5, temperature=0.8)),
    ("no repeats", GenerationOptions(max_new_tokens=12, min_new_tokens=12, no_repeat_ngram_size=2)),
    ("counted", GenerationOptions(max_new_tokens=10, min_new_tokens=10, frequency_penalty=1.5)),
]


MAKERS = pytest.mark.parametrize("make", [TinySeq2SeqGenerator, TinyGPTGenerator], ids=["transformer", "gpt"])


def _datastore(plain) -> DraftIndex:
    """What a bundle stores: replies. Here the model's own greedy replies to most of the questions (drafts it
    agrees with), copies that go astray after a few tokens (drafts it rejects part of) and nothing for
    "unrelated"; the sampled and penalised questions' greedy replies too, which those rows must not use."""
    replies = []
    for text, _ in GREEDY[:-1] + OTHERS:
        ref = plain.reference(text, GenerationOptions(max_new_tokens=50))
        replies.append([*ref, 2])
        replies.append([*ref[:3], *[(t + 7) % 40 + 4 for t in ref[3:9]], 2])
        replies.append([*ref[:3], *[(t + 7) % 40 + 4 for t in ref[3:9]], 2])  # the astray copy is the most frequent
    return DraftIndex(replies, eos_id=2)


def _run(engine, requests):
    async def main():
        return await asyncio.gather(*(_tokens(engine, t, o) for t, o in requests))

    return asyncio.run(main())


@MAKERS
@pytest.mark.parametrize("max_running", [1, 3])
def test_speculative_batching_gives_each_request_the_tokens_of_decoding_it_alone_in_fewer_steps(make, max_running):
    plain = make()
    requests = GREEDY + OTHERS
    want = [plain.reference(t, o) for t, o in requests]
    store = _datastore(plain)

    baseline = Engine({"tiny": make()}, {}, max_running=max_running, draft_tokens=0)
    assert _run(baseline, requests) == want
    engine = Engine({"tiny": make(drafts=store)}, {}, max_running=max_running, draft_tokens=4)
    got = _run(engine, requests)
    for (text, _), g, w in zip(requests, got, want, strict=True):
        assert g == w, text
    snap, base = engine.stats.snapshot(), baseline.stats.snapshot()
    # Drafts were both taken and turned down (the astray copies), and the run took fewer steps.
    assert 0 < snap["accepted_tokens"] < snap["draft_tokens"]
    assert snap["steps"] < base["steps"]
    assert base["draft_tokens"] == 0


@MAKERS
def test_rows_that_sample_penalise_or_ban_ngrams_are_never_drafted(make):
    plain = make()
    engine = Engine({"tiny": make(drafts=_datastore(plain))}, {}, max_running=3, draft_tokens=4)
    got = _run(engine, OTHERS)
    assert got == [plain.reference(t, o) for t, o in OTHERS]
    assert engine.stats.snapshot()["draft_tokens"] == 0


class _NoVerify:
    """A step model without ``verify`` (a family that cannot check drafts)."""

    def __init__(self, inner):
        self.inner, self.max_len = inner, inner.max_len

    def __getattr__(self, name):
        if name in ("verify", "accept"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_a_model_without_verification_decodes_as_before():
    plain = TinySeq2SeqGenerator()
    gen = TinySeq2SeqGenerator(drafts=_datastore(plain))
    spec = gen.step_spec()
    spec.model = _NoVerify(spec.model)
    gen.step_spec = lambda: spec
    engine = Engine({"tiny": gen}, {}, max_running=2, draft_tokens=4)
    assert _run(engine, GREEDY[:3]) == [plain.reference(t, o) for t, o in GREEDY[:3]]
    assert engine.stats.snapshot()["draft_tokens"] == 0


@pytest.mark.parametrize("bad", [-1, 17, 2.5])
def test_draft_tokens_out_of_range_is_refused_naming_the_range(bad):
    with pytest.raises(ValueError, match=r"draft_tokens=.*allowed: an integer in \[0, 16\]"):
        Engine({"tiny": TinyGPTGenerator()}, {}, draft_tokens=bad)


def test_by_default_fp32_and_bf16_models_draft_and_int8_ones_do_not():
    from chatforge.inference import ModelInfo
    from chatforge.serving.engine import DEFAULT_DRAFT_TOKENS

    plain = TinyGPTGenerator()
    store = _datastore(plain)
    int8 = TinyGPTGenerator(name="q", drafts=store)
    int8.info = ModelInfo(name="q", family="gpt", task="generation", metadata={"precision": "int8"})
    engine = Engine({"tiny": TinyGPTGenerator(drafts=store), "q": int8}, {}, max_running=1)
    assert engine._generators["tiny"].runner.draft_tokens == DEFAULT_DRAFT_TOKENS > 0
    assert engine._generators["q"].runner.draft_tokens == 0
    assert _run(engine, GREEDY[1:3]) == [plain.reference(t, o) for t, o in GREEDY[1:3]]
    assert engine.stats.snapshot()["accepted_tokens"] > 0
    # an explicit count applies to every model, int8 too
    engine = Engine({"q": int8}, {}, max_running=1, draft_tokens=2)
    assert engine._generators["q"].runner.draft_tokens == 2


def test_the_server_config_refuses_a_bad_count_before_loading_anything(tmp_path):
    from chatforge.serving.server import ServerConfig

    with pytest.raises(ValueError, match=r"draft_tokens=17 is out of range; allowed: an integer in \[0, 16\]"):
        ServerConfig(bundles={"chat": tmp_path / "missing"}, draft_tokens=17)
