"""ByteNet on a byte tokenizer (tokenizer.kind: byte): bytes in, bytes out, through the shared decoding,
run driver, bundle and inference code."""

import json
from pathlib import Path

import pytest
import torch
from tests.seq2seq_helpers import overfit

from chatforge.bundle import load_bundle
from chatforge.config import validate_config
from chatforge.decoding import GenerationOptions, generate, generate_batch
from chatforge.inference import Seq2SeqGenerator, load_model
from chatforge.models.bytenet import ByteNet, ByteNetConfig
from chatforge.registry import BuildContext, build_model
from chatforge.tokenizer import ByteTokenizer
from chatforge.training.run import run_experiment

TOK = ByteTokenizer()
PAIRS = [("안녕", "반가워요 😊"), ("hi", "hello!"), ("잘 자", "좋은 꿈 꿔요")]


def tiny(**kw) -> ByteNetConfig:
    base = dict(d_model=64, max_dilation=8, encoder_sets=1, decoder_sets=1, dropout=0.0, unfold_a=1.2,
                unfold_b=4, max_len=128)
    base.update(kw)
    return ByteNetConfig(**base)


def build(cfg: ByteNetConfig) -> ByteNet:
    return build_model("bytenet", cfg, BuildContext("generation", TOK.vocab_size, TOK.special, tokenizer=TOK))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_builds_over_bytes_and_rejects_input_unit_byte():
    model = build(tiny())
    assert model.tgt_embed.num_embeddings == model.lm_head.out_features == 263
    assert model.src_embed.num_embeddings == 263 and not model.byte_input
    with pytest.raises(ValueError, match="tokenizer.kind 'byte' already makes every id a byte"):
        build(tiny(input_unit="byte"))


def test_cached_decoding_equals_uncached_for_greedy_beam_and_sampling():
    model = build(tiny(decoder_sets=2)).eval()
    sources = [TOK.encode(q) for q, _ in PAIRS]
    for opts in (GenerationOptions(max_new_tokens=20),
                 GenerationOptions(max_new_tokens=12, num_beams=3),
                 GenerationOptions(max_new_tokens=20, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=3)):
        for s in sources:
            cached = generate(model, s, opts, bos_id=TOK.bos_id, eos_id=TOK.eos_id, use_cache=True)
            assert cached == generate(model, s, opts, bos_id=TOK.bos_id, eos_id=TOK.eos_id, use_cache=False)
            assert cached and all(0 <= i < TOK.vocab_size for i in cached)
    greedy = GenerationOptions(max_new_tokens=20)
    alone = [generate(model, s, greedy, bos_id=TOK.bos_id, eos_id=TOK.eos_id) for s in sources]
    assert generate_batch(model, sources, greedy, bos_id=TOK.bos_id, eos_id=TOK.eos_id, pad_id=TOK.pad_id) == alone


def test_overfits_one_batch_and_greedy_reply_decodes_to_the_training_text():
    src = [TOK.encode(q) for q, _ in PAIRS]
    tgt = [TOK.encode(a) for _, a in PAIRS]
    s_w, t_w = max(map(len, src)), max(map(len, tgt)) + 1
    x = torch.tensor([s + [TOK.pad_id] * (s_w - len(s)) for s in src])
    dec = torch.tensor([[TOK.bos_id] + t + [TOK.pad_id] * (t_w - 1 - len(t)) for t in tgt])
    lab = torch.tensor([t + [TOK.eos_id] + [-100] * (t_w - 1 - len(t)) for t in tgt])
    model = build(tiny(d_model=32))
    assert overfit(model, x, dec, lab, lr=1e-2) < 0.05
    for (q, a), s in zip(PAIRS, src, strict=True):
        ids = generate(model, s, GenerationOptions(max_new_tokens=40), bos_id=TOK.bos_id, eos_id=TOK.eos_id)
        assert TOK.decode(ids) == a, q
        detok = TOK.incremental_decoder()
        assert "".join(detok.feed(i) for i in ids) == a


def _write_pairs(path: Path, n_repeats: int) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n_repeats):
            for q, a in PAIRS:
                f.write(json.dumps({"text": q, "response": a}, ensure_ascii=False) + "\n")
    return path


def tiny_tree(tmp_path, data: Path, steps: int) -> dict:
    return {
        "name": "tiny-bytenet-bytes", "seed": 1,
        "data": {"path": str(data), "format": "jsonl", "valid_fraction": 0.0, "test_fraction": 0.0},
        "tokenizer": {"kind": "byte"},
        "model": {"family": "bytenet", "task": "generation", "d_model": 32, "max_dilation": 8,
                  "encoder_sets": 1, "decoder_sets": 1, "dropout": 0.0, "unfold_b": 4},
        "train": {"epochs": 1000, "max_steps": steps, "batch_size": 3, "lr": 1e-2, "warmup_ratio": 0.0,
                  "schedule": "constant", "max_source_len": 32, "max_target_len": 40},
        "output": {"dir": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }


def test_run_bundle_round_trip_and_served_replies(tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl", 1)
    res = run_experiment(validate_config(tiny_tree(tmp_path, data, 120)), run_dir=tmp_path / "run")
    assert res.metrics["steps"] == 120
    # The tokenizer step wrote the byte tokenizer, not a SentencePiece model, into run and bundle.
    assert (res.run_dir / "byte_tokenizer.json").is_file() and not (res.run_dir / "tokenizer.model").exists()
    meta = json.loads((res.bundle_dir / "metadata.json").read_text())
    assert meta["tokenizer"] == {"kind": "byte", "file": "byte_tokenizer.json", "sha256": TOK.sha256,
                                 "vocab_size": 263}
    b1, b2 = load_bundle(res.bundle_dir), load_bundle(res.bundle_dir)
    assert isinstance(b1.tokenizer, ByteTokenizer) and b1.config.tokenizer.kind == "byte"
    src = torch.randint(7, 263, (2, 9))
    tgt = torch.randint(7, 263, (2, 6))
    with torch.inference_mode():
        assert torch.equal(b1.model(input_ids=src, decoder_input_ids=tgt).logits,
                           b2.model(input_ids=src, decoder_input_ids=tgt).logits)
    g = load_model(res.bundle_dir, name="bytenet-chars")
    assert isinstance(g, Seq2SeqGenerator) and g.count_tokens("안녕") == 6
    for q, a in PAIRS:
        deltas = list(g.stream(q, GenerationOptions(max_new_tokens=40)))
        # One delta per byte; text only appears once a character is complete.
        assert len(deltas) == len(a.encode("utf-8"))
        assert "".join(d.text for d in deltas) == a
        assert not any("\ufffd" in d.text for d in deltas)
