"""Shared modules: attention (masks, KV cache), embeddings, layers vs torch.nn references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from chatforge.modules import (
    FeedForward,
    KVCache,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    SinusoidalPositionalEmbedding,
    TokenEmbedding,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    causal_mask,
    padding_mask,
    sinusoidal_table,
)

D, H = 32, 2



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_mha_shapes_self_and_cross():
    mha = MultiHeadAttention(D, H).eval()
    x, mem = torch.randn(3, 5, D), torch.randn(3, 7, D)
    assert mha(x).shape == (3, 5, D)
    assert mha(x, mem).shape == (3, 5, D)


def test_mha_rejects_bad_heads():
    with pytest.raises(ValueError, match="d_model=30 must be a positive multiple of n_heads=4"):
        MultiHeadAttention(30, 4)


def test_mha_matches_torch_multihead_attention():
    ref = nn.MultiheadAttention(D, H, batch_first=True).eval()
    mha = MultiHeadAttention(D, H).eval()
    mha.load_from_torch(ref)
    q, kv = torch.randn(2, 4, D), torch.randn(2, 6, D)
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]])
    ours = mha(q, kv, mask=padding_mask(ids, 0))
    theirs, _ = ref(q, kv, kv, key_padding_mask=ids == 0, need_weights=False)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_masks_shapes_and_values():
    ids = torch.tensor([[4, 5, 0], [4, 0, 0]])
    pm = padding_mask(ids, pad_id=0)
    assert pm.shape == (2, 1, 1, 3)
    assert pm[0, 0, 0].tolist() == [True, True, False]
    cm = causal_mask(3)
    assert cm.shape == (1, 1, 3, 3)
    assert cm[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # Two new queries after a 3-token cache: they see everything up to their own position.
    assert causal_mask(2, 5)[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]
    with pytest.raises(ValueError, match="k_len"):
        causal_mask(4, 2)


def test_padding_mask_ignores_padded_keys():
    mha = MultiHeadAttention(D, H).eval()
    x = torch.randn(1, 3, D)
    mem = torch.randn(1, 5, D)
    mask = padding_mask(torch.tensor([[7, 7, 7, 0, 0]]), 0)
    out1 = mha(x, mem, mask=mask)
    mem2 = mem.clone()
    mem2[:, 3:] = torch.randn(1, 2, D) * 100  # change only the padded positions
    torch.testing.assert_close(mha(x, mem2, mask=mask), out1)


def test_causal_output_does_not_depend_on_future():
    mha = MultiHeadAttention(D, H).eval()
    x = torch.randn(2, 6, D)
    out = mha(x, mask=causal_mask(6))
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, D)
    out2 = mha(x2, mask=causal_mask(6))
    torch.testing.assert_close(out2[:, :4], out[:, :4])
    assert not torch.allclose(out2[:, 4:], out[:, 4:])


def test_kv_cache_incremental_equals_full():
    mha = MultiHeadAttention(D, H).eval()
    x = torch.randn(2, 5, D)
    full = mha(x, mask=causal_mask(5))
    cache = KVCache()
    steps = [mha(x[:, t : t + 1], cache=cache) for t in range(5)]
    assert len(cache) == 5
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_cross_attention_projects_memory_once_and_reorders():
    mha = MultiHeadAttention(D, H).eval()
    mem = torch.randn(3, 4, D)
    cache = KVCache()
    x = torch.randn(3, 1, D)
    first = mha(x, mem, cache=cache)
    # A second call with garbage memory must reuse the cached projection.
    torch.testing.assert_close(mha(x, torch.zeros_like(mem), cache=cache), first)
    cache.reorder(torch.tensor([2, 0]))
    torch.testing.assert_close(mha(x[[2, 0]], mem[[2, 0]], cache=cache), first[[2, 0]])
    assert cache.k.shape == (2, H, 4, D // H)


def test_sinusoidal_table_matches_formula():
    table = sinusoidal_table(10, 6)
    for pos in (0, 3, 9):
        for i in range(3):
            angle = pos / (10000 ** (2 * i / 6))
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sinusoidal_table(4, 5).shape == (4, 5)  # odd width works


@pytest.mark.parametrize("cls", [SinusoidalPositionalEmbedding, LearnedPositionalEmbedding])
def test_positional_embeddings_offset_and_limit(cls):
    pe = cls(8, D)
    full = pe(8)
    assert full.shape == (1, 8, D)
    torch.testing.assert_close(pe(3, offset=5), full[:, 5:8])
    with pytest.raises(ValueError, match="max_len=8"):
        pe(3, offset=6)


def test_sinusoidal_not_saved_in_state_dict():
    assert "table" not in SinusoidalPositionalEmbedding(8, D).state_dict()


def test_token_embedding_scales_by_sqrt_d_and_zeroes_pad():
    emb = TokenEmbedding(11, 16, padding_idx=0)
    ids = torch.tensor([[0, 3]])
    out = emb(ids)
    assert torch.all(out[0, 0] == 0)
    torch.testing.assert_close(out[0, 1], emb.weight[3] * 4.0)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_feedforward_activation(activation):
    ff = FeedForward(D, 64, 0.0, activation)
    x = torch.randn(2, 3, D)
    act = torch.relu if activation == "relu" else torch.nn.functional.gelu
    torch.testing.assert_close(ff(x), ff.linear2(act(ff.linear1(x))))
    with pytest.raises(ValueError, match="allowed: relu, gelu"):
        FeedForward(D, 64, 0.0, "tanh")


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_layers_match_torch(norm_first, activation):
    kw = dict(dim_feedforward=64, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first)
    ref_enc = nn.TransformerEncoderLayer(D, H, **kw).eval()
    ref_dec = nn.TransformerDecoderLayer(D, H, **kw).eval()
    enc = TransformerEncoderLayer(D, H, 64, 0.0, activation, norm_first).eval()
    dec = TransformerDecoderLayer(D, H, 64, 0.0, activation, norm_first).eval()
    enc.load_from_torch(ref_enc)
    dec.load_from_torch(ref_dec)
    x, y = torch.randn(2, 5, D), torch.randn(2, 4, D)
    src_ids = torch.tensor([[5, 5, 5, 0, 0], [5, 5, 5, 5, 5]])
    # Grad mode on keeps torch off its fused fast path, which zeroes padded positions.
    ours_mem = enc(x, padding_mask(src_ids, 0))
    ref_mem = ref_enc(x, src_key_padding_mask=src_ids == 0)
    torch.testing.assert_close(ours_mem[0, :3], ref_mem[0, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_mem[1], ref_mem[1], atol=1e-5, rtol=1e-5)
    ours = dec(y, ours_mem, self_mask=causal_mask(4), memory_mask=padding_mask(src_ids, 0))
    ref = ref_dec(y, ref_mem, tgt_mask=~causal_mask(4)[0, 0], memory_key_padding_mask=src_ids == 0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
