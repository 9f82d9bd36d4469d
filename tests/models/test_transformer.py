"""The Transformer family: config validation, registry, parity with torch.nn.Transformer,
masking, incremental decoding interface and overfitting tiny batches."""

from __future__ import annotations

import warnings

import pytest
import torch
from pydantic import ValidationError
from tests.seq2seq_helpers import overfit, overfit_batch, seq2seq_batch
from torch import nn

from chatforge.models.transformer import (
    TransformerClassifier,
    TransformerConfig,
    TransformerSeq2Seq,
    load_from_torch_transformer,
)
from chatforge.modules import causal_mask, padding_mask
from chatforge.registry import BuildContext, SpecialIds, build_model, families

PAD, BOS, EOS = 0, 1, 2
V = 20


def tiny(**kw) -> TransformerConfig:
    base = dict(d_model=32, n_heads=2, num_encoder_layers=2, num_decoder_layers=2, d_ff=64, dropout=0.0,
                max_len=32, label_smoothing=0.0)
    base.update(kw)
    return TransformerConfig(**base)



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- config ----


def test_config_defaults():
    cfg = TransformerConfig()
    assert (cfg.d_model, cfg.n_heads, cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.d_ff) == (256, 4, 3, 3, 1024)
    assert (cfg.dropout, cfg.activation, cfg.max_len, cfg.norm_first) == (0.1, "relu", 512, False)
    assert (cfg.tie_embeddings, cfg.label_smoothing, cfg.pooling) == (True, 0.1, "mean")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(d_model=30, n_heads=4), "d_model=30 must be divisible by n_heads=4"),
        (dict(d_model=0), "d_model"),
        (dict(dropout=1.0), "dropout"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(activation="tanh"), "activation"),
        (dict(pooling="max"), "pooling"),
        (dict(n_layers=2), "n_layers"),  # unknown key
    ],
)
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValidationError) as info:
        TransformerConfig(**kwargs)
    assert needle in str(info.value)


# ---- registry ----


def test_registered_for_both_tasks():
    assert "transformer" in families()
    gen = build_model("transformer", tiny(), BuildContext("generation", V, SpecialIds()))
    clf = build_model("transformer", tiny(), BuildContext("classification", V, SpecialIds(), num_labels=3))
    assert isinstance(gen, TransformerSeq2Seq)
    assert isinstance(clf, TransformerClassifier)
    with pytest.raises(ValueError, match="num_labels"):
        build_model("transformer", tiny(), BuildContext("classification", V, SpecialIds()))
    with pytest.raises(ValueError, match="does not support task 'lm'"):
        build_model("transformer", tiny(), BuildContext("lm", V, SpecialIds()))


def test_pad_id_comes_from_context():
    model = build_model("transformer", tiny(), BuildContext("generation", V, SpecialIds(pad=7)))
    assert model.pad_id == 7
    assert torch.all(model.src_embed.weight[7] == 0)


def test_tied_embeddings_share_one_matrix():
    tied = TransformerSeq2Seq(tiny(), V, PAD)
    assert tied.lm_head.weight is tied.src_embed.weight is tied.tgt_embed.weight
    untied = TransformerSeq2Seq(tiny(tie_embeddings=False), V, PAD)
    assert untied.lm_head.weight is not untied.tgt_embed.weight
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(tied) == 2 * V * 32


# ---- parity with torch.nn.Transformer ----


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_parity_with_torch_transformer(norm_first, activation):
    model = TransformerSeq2Seq(tiny(norm_first=norm_first, activation=activation), V, PAD).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor notice for norm_first
        ref = nn.Transformer(d_model=32, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                             dim_feedforward=64, dropout=0.0, activation=activation, batch_first=True,
                             norm_first=norm_first).eval()
    if not norm_first:
        # nn.Transformer always adds a final LayerNorm; the paper's post-LN stack has none.
        ref.encoder.norm = None
        ref.decoder.norm = None
    load_from_torch_transformer(model, ref)

    src_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 0, 0, 0]])
    x, y = torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    src_pad = src_ids == PAD
    # Grad mode stays on so torch skips its fast path (which zeroes padded encoder outputs).
    ref_mem = ref.encoder(x, src_key_padding_mask=src_pad)
    ref_out = ref.decoder(y, ref_mem, tgt_mask=nn.Transformer.generate_square_subsequent_mask(4),
                          memory_key_padding_mask=src_pad)
    mem = model.encoder(x, padding_mask(src_ids, PAD))
    out = model.decoder(y, mem, self_mask=causal_mask(4), memory_mask=padding_mask(src_ids, PAD))
    keep = ~src_pad
    torch.testing.assert_close(mem[keep], ref_mem[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    # And end to end through nn.Transformer.forward.
    full = ref(x, y, src_key_padding_mask=src_pad, tgt_mask=nn.Transformer.generate_square_subsequent_mask(4),
               memory_key_padding_mask=src_pad)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


def test_load_from_torch_rejects_mismatched_norms():
    model = TransformerSeq2Seq(tiny(), V, PAD)
    ref = nn.Transformer(d_model=32, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                         batch_first=True)
    with pytest.raises(ValueError, match="final norm mismatch"):
        load_from_torch_transformer(model, ref)


# ---- forward, masks ----


def test_forward_shapes_and_ignored_labels():
    model = TransformerSeq2Seq(tiny(label_smoothing=0.1), V, PAD).eval()
    src = torch.randint(3, V, (3, 7))
    dec = torch.randint(3, V, (3, 5))
    out = model(src, dec)
    assert out.logits.shape == (3, 5, V) and out.loss is None
    labels = torch.randint(3, V, (3, 5))
    loss = model(src, dec, labels=labels).loss
    labels2 = labels.clone()
    labels2[:, -1] = -100
    loss2 = model(src, dec, labels=labels2).loss
    assert torch.isfinite(loss) and torch.isfinite(loss2) and not torch.isclose(loss, loss2)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :4].reshape(-1, V), labels[:, :4].reshape(-1),
                                            label_smoothing=0.1)
    torch.testing.assert_close(loss2, ref)


def test_decoder_position_t_ignores_later_inputs():
    model = TransformerSeq2Seq(tiny(), V, PAD).eval()
    src = torch.randint(3, V, (2, 6))
    dec = torch.randint(3, V, (2, 6))
    dec2 = dec.clone()
    dec2[:, 3:] = torch.randint(3, V, (2, 3))
    a, b = model(src, dec).logits, model(src, dec2).logits
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_source_padding_does_not_change_result():
    for cls_task in ("generation", "classification"):
        model = build_model("transformer", tiny(), BuildContext(cls_task, V, SpecialIds(), num_labels=3)).eval()
        src = torch.tensor([[5, 6, 7, 8]])
        padded = torch.tensor([[5, 6, 7, 8, 0, 0, 0]])
        if cls_task == "generation":
            dec = torch.tensor([[BOS, 9, 10]])
            torch.testing.assert_close(model(src, dec).logits, model(padded, dec).logits, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(model(src).logits, model(padded).logits, atol=1e-5, rtol=1e-5)


def test_classifier_shapes_and_pooling():
    for pooling in ("mean", "first"):
        model = TransformerClassifier(tiny(pooling=pooling), V, PAD, num_labels=4).eval()
        out = model(torch.randint(3, V, (5, 6)), labels=torch.tensor([0, 1, 2, 3, 0]))
        assert out.logits.shape == (5, 4)
        assert out.loss is not None and out.loss.ndim == 0


def test_decode_step_matches_teacher_forcing():
    model = TransformerSeq2Seq(tiny(tie_embeddings=False), V, PAD).eval()
    src = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    dec = torch.tensor([[BOS, 12, 13, 14], [BOS, 15, 16, 17]])
    full = model(src, dec).logits
    for use_cache in (True, False):
        state = model.init_state(src, use_cache=use_cache)
        steps = torch.stack([model.decode_step(dec[:, t : t + 1], state) for t in range(4)], 1)
        torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_state_reorder_selects_rows():
    model = TransformerSeq2Seq(tiny(tie_embeddings=False), V, PAD).eval()
    src = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    state = model.init_state(src)
    model.decode_step(torch.full((3, 1), BOS), state)
    state.reorder(torch.tensor([2, 0]))
    got = model.decode_step(torch.tensor([[4], [4]]), state)
    ref_state = model.init_state(src[[2, 0]])
    model.decode_step(torch.full((2, 1), BOS), ref_state)
    torch.testing.assert_close(got, model.decode_step(torch.tensor([[4], [4]]), ref_state), atol=1e-5, rtol=1e-5)


def test_init_state_rejects_bad_input():
    model = TransformerSeq2Seq(tiny(max_len=8), V, PAD)
    with pytest.raises(ValueError, match="max_len is 8"):
        model.init_state(torch.ones(1, 9, dtype=torch.long) * 5)
    with pytest.raises(ValueError, match="non-pad token"):
        model.init_state(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        model.init_state(torch.zeros(1, 0, dtype=torch.long))


# ---- overfitting ----


def test_seq2seq_overfits_four_mappings():
    from chatforge.decoding import GenerationOptions, generate

    # Map each source to a different target (reverse + shift), so copying alone is not enough.
    pairs = [([5, 6, 7], [8, 9]), ([6, 7, 8, 9], [10, 11, 12]), ([10, 11], [5, 5, 6]), ([12, 13, 14], [7])]
    src, dec, lab = seq2seq_batch(pairs, PAD, BOS, EOS)
    model = TransformerSeq2Seq(tiny(), V, PAD)
    assert overfit(model, src, dec, lab, lr=3e-3) < 0.05
    for s, t in pairs:
        assert generate(model, s, GenerationOptions(max_new_tokens=6), bos_id=BOS, eos_id=EOS) == t


def test_classifier_overfits_tiny_batch():
    x = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13], [14, 15, 0, 0], [5, 9, 13, 0], [16, 17, 18, 0]])
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = TransformerClassifier(tiny(num_decoder_layers=1), V, PAD, num_labels=3)
    assert overfit_batch(model, (x,), {"labels": y}, lr=3e-3, steps=200) < 0.05
    assert model(x).logits.argmax(-1).tolist() == y.tolist()
