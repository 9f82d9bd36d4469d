"""The draft datastore of speculative decoding (``chatforge.drafts``): which draft a reply prefix gets, how it is
saved in a bundle and refused when damaged, and that training a generation bundle stores its training replies
there and serving it with drafts gives the replies it gives without."""

from __future__ import annotations

import asyncio
import json

import pytest

from chatforge.bundle import BundleError, load_bundle
from chatforge.config import validate_config
from chatforge.decoding import GenerationOptions
from chatforge.drafts import DRAFTS_DIR, REPLIES_FILE, DraftIndex, DraftIndexError
from chatforge.inference import TokenDelta
from chatforge.training.run import load_splits, run_experiment

EOS = 2


def test_a_draft_follows_the_most_frequent_continuation_and_stops_at_eos():
    idx = DraftIndex([[5, 6, 7, EOS], [5, 6, 8, EOS], [5, 6, 8, 9, EOS], [10, EOS]], eos_id=EOS)
    root = 0
    assert idx.draft(root, 8) == [5, 6, 8, EOS]  # 8 follows "5 6" twice, 7 once; the chain ends at </s>
    assert idx.draft(root, 2) == [5, 6]
    node = idx.advance(idx.advance(root, 5), 6)
    assert idx.draft(node, 8) == [8, EOS]
    assert idx.draft(idx.advance(node, 7), 8) == [EOS]
    assert idx.advance(node, 11) is None and idx.draft(None, 8) == []  # off every stored reply: no drafts
    assert idx.advance(None, 5) is None
    assert DraftIndex([[5, 6, EOS], [5, 7, EOS]], eos_id=EOS).draft(0, 3) == [5, 6, EOS]  # a tie: the first seen
    assert len(idx) == 4 and idx.nodes == 11  # the root and one node per distinct prefix


def test_a_reply_off_every_stored_reply_is_continued_from_its_last_tokens():
    idx = DraftIndex([[5, 6, 7, 8, EOS], [9, 6, 7, 8, EOS], [9, 4, 7, 3, EOS]], eos_id=EOS)
    assert idx.draft(None, 8, (11, 6)) == [7, 8, EOS]  # "6" was followed by "7" twice; "6 7" by "8"
    assert idx.draft(None, 2, (11, 6)) == [7, 8]
    assert idx.draft(None, 8, (4, 7)) == [3, EOS]  # two tokens of context before one: "4 7" -> 3, not "7" -> 8
    assert idx.draft(None, 8, (11, 12)) == [] and idx.draft(None, 8, ()) == []


def test_a_draft_stops_where_its_estimated_probability_gets_low():
    replies = [[5, 6, EOS], [5, 7, EOS], [5, 8, EOS], [5, 9, EOS], [5, 10, EOS]]
    after_5 = DraftIndex(replies, eos_id=EOS).advance(0, 5)
    assert DraftIndex(replies, eos_id=EOS, min_probability=0.3).draft(after_5, 4) == []  # 6 is one reply of five
    assert DraftIndex(replies, eos_id=EOS, min_probability=0.1).draft(after_5, 4) == [6, EOS]
    assert DraftIndex(replies, eos_id=EOS, min_probability=0.0).draft(None, 4, (9,)) == [EOS]
    with pytest.raises(ValueError, match=r"min_probability=1.5 is out of range; allowed: a number in \[0, 1\]"):
        DraftIndex(replies, eos_id=EOS, min_probability=1.5)


def test_save_and_load_round_trip(tmp_path):
    idx = DraftIndex([[5, 6, EOS], [7, EOS]], eos_id=EOS)
    idx.save(tmp_path / DRAFTS_DIR)
    back = DraftIndex.load(tmp_path / DRAFTS_DIR, vocab_size=8)
    assert back.replies == idx.replies and back.eos_id == EOS and back.draft(0, 4) == idx.draft(0, 4)


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read the draft datastore"),
    (json.dumps({"format": 2, "eos_id": 2, "replies": []}), "not a draft datastore of format 1"),
    (json.dumps({"format": 1, "eos_id": "2", "replies": []}), "eos_id must be an integer"),
    (json.dumps({"format": 1, "eos_id": 2, "replies": [[5, 6], [5, 99]]}), r"reply 1 must be a list .* in \[0, 8\)"),
    (json.dumps({"format": 1, "eos_id": 2, "replies": [[5, True]]}), r"reply 0 must be a list"),
    (json.dumps({"format": 1, "eos_id": 2, "replies": [[-1]]}), r"reply 0 must be a list"),
])
def test_a_damaged_datastore_is_refused_naming_the_file_and_what_is_wrong(tmp_path, content, message):
    (tmp_path / REPLIES_FILE).write_text(content)
    with pytest.raises(DraftIndexError, match=message) as e:
        DraftIndex.load(tmp_path, vocab_size=8)
    assert str(tmp_path / REPLIES_FILE) in str(e.value)


def tiny_generation_config():
    """A Transformer generator on the packaged sample corpus that trains in seconds."""
    return validate_config({
        "name": "drafts", "seed": 0, "data": {"path": "sample", "valid_fraction": 0.05, "test_fraction": 0.0},
        "tokenizer": {"model_type": "unigram", "vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "transformer", "task": "generation", "d_model": 32, "n_heads": 2,
                  "num_encoder_layers": 1, "num_decoder_layers": 1, "d_ff": 64, "dropout": 0.0},
        "train": {"epochs": 8, "batch_size": 32, "lr": 3e-3, "max_source_len": 32, "max_target_len": 32},
        "tracking": {"enabled": False},
    })


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory):
    cfg = tiny_generation_config()
    return cfg, run_experiment(cfg, run_dir=tmp_path_factory.mktemp("run") / "run")


def test_a_generation_bundle_stores_its_training_replies(generation_run):
    cfg, result = generation_run
    bundle = load_bundle(result.bundle_dir)
    train, valid, _, _ = load_splits(cfg)
    want = [[*bundle.tokenizer.encode(e.response), bundle.tokenizer.eos_id] for e in train]
    assert bundle.drafts is not None and bundle.drafts.replies == want
    assert len(want) == len(train) and valid  # the training split's replies only, one per pair
    (result.bundle_dir / DRAFTS_DIR / REPLIES_FILE).write_text('{"format": 1, "eos_id": 2, "replies": [[100000]]}')
    try:
        with pytest.raises(BundleError, match=f"{DRAFTS_DIR}/{REPLIES_FILE}: reply 0 must be a list"):
            load_bundle(result.bundle_dir)
    finally:
        bundle.drafts.save(result.bundle_dir / DRAFTS_DIR)


def test_serving_a_bundle_with_drafts_gives_the_replies_it_gives_without(generation_run):
    from chatforge.serving.engine import Engine

    cfg, result = generation_run
    train, _, _, _ = load_splits(cfg)
    questions = [e.text for e in train[:12]] + ["처음 보는 질문이에요", "a question nobody asked"]

    def replies(draft_tokens):
        engine = Engine.from_bundles({"chat": str(result.bundle_dir)}, draft_tokens=draft_tokens, max_running=4)

        async def one(q):
            return [d.token_id async for d in engine.stream_reply(q, GenerationOptions(max_new_tokens=24), None)
                    if isinstance(d, TokenDelta)]

        async def main():
            return await asyncio.gather(*(one(q) for q in questions))

        out = asyncio.run(main())
        return out, engine.stats.snapshot()

    plain, plain_stats = replies(0)
    drafted, stats = replies(4)
    assert drafted == plain
    assert plain_stats["draft_tokens"] == 0 and stats["draft_tokens"] > 0
