"""ByteNet: receptive field, causality, cached == uncached decoding, overfitting, bundles, configs."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tests.seq2seq_helpers import overfit, seq2seq_batch

from chatforge.bundle import load_bundle
from chatforge.config import apply_overrides, load_config, validate_config
from chatforge.decoding import GenerationOptions, generate, generate_batch
from chatforge.inference import Seq2SeqGenerator, load_model
from chatforge.models.bytenet import ByteNet, ByteNetConfig
from chatforge.modules.dilated_conv import DilatedConvStack, dilation_schedule, receptive_field
from chatforge.registry import BuildContext, SpecialIds, build_model
from chatforge.training.run import run_experiment

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PAD, BOS, EOS = 0, 1, 2
V = 20


def tiny(**kw) -> ByteNetConfig:
    base = dict(d_model=32, max_dilation=4, encoder_sets=1, decoder_sets=2, dropout=0.0, unfold_a=1.0,
                unfold_b=2, max_len=64)
    base.update(kw)
    return ByteNetConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="must be even"):
        tiny(d_model=31)
    with pytest.raises(ValidationError, match="power of two"):
        tiny(max_dilation=6)
    with pytest.raises(ValidationError, match="n_layers"):
        ByteNetConfig(n_layers=3)
    with pytest.raises(ValueError, match="does not support task 'classification'"):
        build_model("bytenet", tiny(), BuildContext("classification", V, SpecialIds(), num_labels=2))


def test_receptive_field_matches_config():
    assert dilation_schedule(4, 2) == [1, 2, 4, 1, 2, 4]
    assert dilation_schedule(16, 1) == [1, 2, 4, 8, 16]
    model = ByteNet(tiny(), V, PAD)
    assert model.decoder_receptive_field == 1 + 2 * (1 + 2 + 4) * 2 == receptive_field(3, [1, 2, 4] * 2)
    assert model.encoder_receptive_field == 1 + 2 * 7


@pytest.mark.parametrize("causal", [True, False])
def test_receptive_field_is_what_the_output_sees(causal):
    stack = DilatedConvStack(16, 3, dilation_schedule(4, 2), causal=causal)
    rf = stack.receptive_field  # 29
    x = torch.randn(1, 64, 16, requires_grad=True)
    t = 40
    stack(x)[0, t].sum().backward()
    seen = (x.grad[0].abs().sum(-1) > 0).nonzero().squeeze(1).tolist()
    expected = list(range(t - rf + 1, t + 1)) if causal else list(range(t - rf // 2, t + rf // 2 + 1))
    assert seen == expected


def test_decoder_output_at_t_ignores_later_inputs():
    model = ByteNet(tiny(), V, PAD).eval()
    src = torch.randint(3, V, (2, 6))
    dec = torch.randint(3, V, (2, 9))
    dec2 = dec.clone()
    dec2[:, 4:] = torch.randint(3, V, (2, 5))
    a, b = model(src, dec).logits, model(src, dec2).logits
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_source_padding_does_not_change_result():
    model = ByteNet(tiny(), V, PAD).eval()
    src, padded = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 7, 8, 0, 0, 0]])
    dec = torch.tensor([[BOS, 9, 10, 11, 12, 13, 14, 15, 16]])  # runs past |t^| = 6
    torch.testing.assert_close(model(src, dec).logits, model(padded, dec).logits, atol=1e-5, rtol=1e-5)


def test_dynamic_unfolding_length():
    model = ByteNet(tiny(unfold_a=1.2, unfold_b=3), V, PAD)
    assert model.unfolded_length(torch.tensor([1, 10])).tolist() == [4, 15]
    src = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [5, 6, 0, 0, 0, 0, 0, 0, 0, 0]])
    rep = model.encode(src)  # (B, U, D)
    assert rep.size(1) == 15
    nonzero = rep.abs().sum(-1) > 0
    assert nonzero[0].all() and nonzero[1, :5].all() and not nonzero[1, 5:].any()


def test_cached_decoding_equals_uncached_and_teacher_forcing():
    model = ByteNet(tiny(), V, PAD).eval()
    src = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    dec = torch.randint(3, V, (2, 12))  # beyond |t^| (6 and 5): unfolding with zero source
    dec[:, 0] = BOS
    with torch.inference_mode():
        full = model(src, dec).logits
        for use_cache in (True, False):
            state = model.init_state(src, use_cache=use_cache)
            steps = torch.stack([model.decode_step(dec[:, t : t + 1], state) for t in range(12)], 1)
            torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    opts = GenerationOptions(max_new_tokens=15)
    for s in ([5, 6, 7], [8, 9, 10, 11]):
        cached = generate(model, s, opts, bos_id=BOS, eos_id=EOS, use_cache=True)
        assert cached == generate(model, s, opts, bos_id=BOS, eos_id=EOS, use_cache=False)
    batch = [[5, 6, 7], [8, 9, 10, 11], [12]]
    alone = [generate(model, s, opts, bos_id=BOS, eos_id=EOS) for s in batch]
    assert generate_batch(model, batch, opts, bos_id=BOS, eos_id=EOS, pad_id=PAD) == alone


def test_state_reorder_selects_rows():
    model = ByteNet(tiny(), V, PAD).eval()
    src = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    with torch.inference_mode():
        state = model.init_state(src)
        model.decode_step(torch.full((3, 1), BOS), state)
        state.reorder(torch.tensor([2, 0]))
        got = model.decode_step(torch.tensor([[4], [5]]), state)
        ref = model.init_state(src[[2, 0]])
        model.decode_step(torch.full((2, 1), BOS), ref)
        torch.testing.assert_close(got, model.decode_step(torch.tensor([[4], [5]]), ref), atol=1e-5, rtol=1e-5)


def test_init_state_rejects_bad_input():
    model = ByteNet(tiny(), V, PAD)
    with pytest.raises(ValueError, match="non-pad token"):
        model.init_state(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        model.init_state(torch.zeros(1, 0, dtype=torch.long))
    state = model.init_state(torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match=r"shape \(1, 1\)"):
        model.decode_step(torch.tensor([[1, 2]]), state)


def test_overfits_four_mappings():
    pairs = [([5, 6, 7], [8, 9]), ([6, 7, 8, 9], [10, 11, 12]), ([10, 11], [5, 5, 6]), ([12, 13, 14], [7])]
    src, dec, lab = seq2seq_batch(pairs, PAD, BOS, EOS)
    model = ByteNet(tiny(decoder_sets=1), V, PAD)
    assert overfit(model, src, dec, lab, lr=5e-3) < 0.05
    for s, t in pairs:
        assert generate(model, s, GenerationOptions(max_new_tokens=6), bos_id=BOS, eos_id=EOS) == t


# ---- run driver, bundle, serving, configs ----


def tiny_tree(tmp_path) -> dict:
    return {
        "name": "tiny-bytenet", "seed": 1,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.1},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "bytenet", "task": "generation", "d_model": 32, "max_dilation": 2,
                  "encoder_sets": 1, "decoder_sets": 1, "dropout": 0.0},
        "train": {"epochs": 1, "max_steps": 4, "batch_size": 16, "lr": 1e-3, "max_source_len": 16,
                  "max_target_len": 16},
        "output": {"dir": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }


def test_run_save_load_serve(tmp_path):
    res = run_experiment(validate_config(tiny_tree(tmp_path)), run_dir=tmp_path / "run")
    assert res.metrics["steps"] == 4 and len(res.metrics["samples"]) > 0
    b1, b2 = load_bundle(res.bundle_dir), load_bundle(res.bundle_dir)
    src = torch.randint(4, b1.tokenizer.vocab_size, (2, 7))
    tgt = torch.randint(4, b1.tokenizer.vocab_size, (2, 5))
    with torch.inference_mode():
        assert torch.equal(b1.model(input_ids=src, decoder_input_ids=tgt).logits,
                           b2.model(input_ids=src, decoder_input_ids=tgt).logits)
    g = load_model(res.bundle_dir, name="bytenet")
    assert isinstance(g, Seq2SeqGenerator) and g.info.family == "bytenet"
    deltas = list(g.stream("안녕하세요", GenerationOptions(max_new_tokens=5)))
    assert 1 <= len(deltas) <= 5
    assert "".join(d.text for d in deltas) == g.tok.decode([d.token_id for d in deltas])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("bytenet_*.yaml")), ids=lambda p: p.name)
def test_shipped_config_runs_one_step(path, tmp_path):
    cfg = load_config(path)
    data = Path(cfg.data.path)
    if not data.is_absolute() and data.parts[:3] == ("..", "shared", "data"):
        data = SHARED.joinpath(*data.parts[3:])
    if not data.is_file():
        pytest.skip(f"data set {data} not found (see ../shared/data/README.md)")
    # A byte tokenizer has no size to shrink (its SentencePiece keys are rejected); others train a small one.
    small_vocab = [] if cfg.tokenizer.kind == "byte" else [
        "tokenizer.vocab_size=600", "tokenizer.character_coverage=0.98", "tokenizer.on_vocab_too_large=lower"]
    tree = apply_overrides(cfg.to_dict(), [
        f"data.path={data}", "data.max_examples=64", "data.valid_fraction=0.01", "data.test_fraction=0.0",
        *small_vocab, "train.max_steps=1",
        "train.batch_size=8", "train.max_source_len=12", "train.max_target_len=8", "model.d_model=16",
        "model.max_dilation=2", "model.encoder_sets=1", "model.decoder_sets=1", "tracking.enabled=false",
        f"output.dir={tmp_path}",
    ])
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "run")
    assert res.metrics["steps"] == 1 and (res.bundle_dir / "weights.safetensors").is_file()


# ---- input_unit: byte (source network reads UTF-8 bytes; targets stay tokenizer pieces) ----

PIECES = ["<pad>", "<s>", "</s>", "<unk>", "▁안녕", "하세요", "▁hi", "▁there", "!", "<0x41>", "▁", "요",
          "▁잘", "가", "▁bye", "s", "▁네", "ok", "▁a", "b"]
SPECIALS = [PAD, BOS, EOS, 3]


def byte_model(**kw) -> ByteNet:
    return ByteNet(tiny(input_unit="byte", unfold_a=0.5, **kw), V, PAD, pieces=PIECES, special_ids=SPECIALS)


def test_byte_input_spells_ids_as_utf8():
    model = byte_model()
    ids = torch.tensor([[4, 5, 8, 0, 0], [6, 7, 9, 3, 0]])
    got = model.to_bytes(ids)
    rows = [" 안녕하세요!".encode(), b" hi thereA"]
    for r, raw in enumerate(rows):
        n = len(raw) + (1 if r == 1 else 0)  # <unk> is one reserved symbol
        assert got[r, : len(raw)].tolist() == [b + 2 for b in raw]
        assert (got[r, n:] == 0).all()
    assert got[1, len(rows[1])].item() == 1 and got.size(1) == len(rows[0])
    assert model.src_embed.num_embeddings == 258 and model.tgt_embed.num_embeddings == V
    with pytest.raises(ValueError, match="input_unit 'byte' needs the tokenizer's 20 pieces"):
        ByteNet(tiny(input_unit="byte"), V, PAD)
    with pytest.raises(ValueError, match="needs the tokenizer in BuildContext"):
        build_model("bytenet", tiny(input_unit="byte"), BuildContext("generation", V, SpecialIds()))
    with pytest.raises(ValidationError, match="subword"):
        tiny(input_unit="char")


def test_byte_input_builds_from_registry_with_a_tokenizer():
    class Tok:
        vocab_size = V

        def id_to_piece(self, i):
            return PIECES[i]

    m = build_model("bytenet", tiny(input_unit="byte"), BuildContext("generation", V, SpecialIds(), tokenizer=Tok()))
    torch.testing.assert_close(m.to_bytes(torch.tensor([[6]])), torch.tensor([[b + 2 for b in b" hi"]]))


def test_byte_input_padding_and_cached_decoding():
    model = byte_model().eval()
    src, padded = torch.tensor([[4, 5]]), torch.tensor([[4, 5, 0, 0]])
    dec = torch.tensor([[BOS, 9, 10, 11, 12, 13, 14, 15, 16]])
    torch.testing.assert_close(model(src, dec).logits, model(padded, dec).logits, atol=1e-5, rtol=1e-5)
    src = torch.tensor([[4, 5, 8, 0], [6, 7, 9, 3]])
    dec = torch.randint(3, V, (2, 14))  # runs past |t^| of the byte source
    dec[:, 0] = BOS
    with torch.inference_mode():
        full = model(src, dec).logits
        for use_cache in (True, False):
            state = model.init_state(src, use_cache=use_cache)
            steps = torch.stack([model.decode_step(dec[:, t : t + 1], state) for t in range(14)], 1)
            torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    opts = GenerationOptions(max_new_tokens=12)
    for s in ([4, 5], [6, 7, 9], [17]):
        assert generate(model, s, opts, bos_id=BOS, eos_id=EOS, use_cache=True) == \
            generate(model, s, opts, bos_id=BOS, eos_id=EOS, use_cache=False)


def test_byte_input_overfits_four_mappings():
    # Sources differ only in their bytes' order and content; targets are tokenizer pieces.
    pairs = [([4, 5], [8, 9]), ([6, 7, 8], [10, 11, 12]), ([12, 13], [5, 5, 6]), ([14, 15], [7])]
    src, dec, lab = seq2seq_batch(pairs, PAD, BOS, EOS)
    model = byte_model(decoder_sets=1)
    assert overfit(model, src, dec, lab, lr=5e-3) < 0.05
    for s, t in pairs:
        assert generate(model, s, GenerationOptions(max_new_tokens=6), bos_id=BOS, eos_id=EOS) == t


def test_byte_input_run_bundle_round_trip_and_serving(tmp_path):
    tree = tiny_tree(tmp_path)
    tree["model"].update(input_unit="byte", unfold_a=0.5)
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "run")
    assert res.metrics["steps"] == 4
    b1, b2 = load_bundle(res.bundle_dir), load_bundle(res.bundle_dir)
    assert b1.model.byte_input and torch.equal(b1.model.byte_table, b2.model.byte_table)
    ids = b1.tokenizer.encode("안녕하세요 반가워요")
    text = "".join(b1.tokenizer.id_to_piece(i) for i in ids).replace("▁", " ")
    assert b1.model.to_bytes(torch.tensor([ids]))[0].tolist() == [b + 2 for b in text.encode()]
    src = torch.randint(4, b1.tokenizer.vocab_size, (2, 7))
    tgt = torch.randint(4, b1.tokenizer.vocab_size, (2, 5))
    with torch.inference_mode():
        assert torch.equal(b1.model(input_ids=src, decoder_input_ids=tgt).logits,
                           b2.model(input_ids=src, decoder_input_ids=tgt).logits)
    g = load_model(res.bundle_dir, name="bytenet-bytes")
    deltas = list(g.stream("안녕하세요", GenerationOptions(max_new_tokens=5)))
    assert 1 <= len(deltas) <= 5
    assert "".join(d.text for d in deltas) == g.tok.decode([d.token_id for d in deltas])
