"""Materialized attention (``modules.attention.materialized_attention``): the training path on CPU for small products,
checked against ``F.scaled_dot_product_attention`` in outputs and gradients, and where it is and is not used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatforge.modules import MultiHeadAttention, causal_mask, padding_mask
from chatforge.modules import attention as attention_mod
from chatforge.modules.attention import (
    attention_kernel,
    materialize_limit,
    materialized_attention,
    use_materialized,
)


def _qkv(b=3, h=2, t=5, s=None, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = t if s is None else s
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k, v


def _out_and_grads(fn, q, k, v, **kw):
    y = fn(q, k, v, **kw)
    grad = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    gq, gk, gv = torch.autograd.grad(y, (q, k, v), grad)
    return y, gq, gk, gv


def _masks():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0], [5, 0, 0, 0, 0]])
    full = torch.ones(3, 1, 5, 5, dtype=torch.bool)
    full[1, 0, 2] = False  # a query row with no key at all: SDPA answers zeros
    return {"padding": padding_mask(ids, 0), "padding and causal": padding_mask(ids, 0) & causal_mask(5),
            "per query, one row empty": full}


@pytest.mark.parametrize("kind", ["causal", "padding", "padding and causal", "per query, one row empty", "none"])
def test_matches_sdpa_in_outputs_and_gradients(kind):
    q, k, v = _qkv()
    kw = {"is_causal": True} if kind == "causal" else {"attn_mask": _masks()[kind]} if kind != "none" else {}
    ref = _out_and_grads(F.scaled_dot_product_attention, q, k, v, **kw)
    mine_kw = {"is_causal": True} if kind == "causal" else {"mask": kw.get("attn_mask")}
    got = _out_and_grads(materialized_attention, q, k, v, **mine_kw)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    if kind == "per query, one row empty":
        assert torch.equal(got[0][1, :, 2], torch.zeros_like(got[0][1, :, 2]))
        assert not torch.isnan(got[1]).any()


def test_cross_attention_with_more_keys_than_queries():
    q, k, v = _qkv(t=3, s=7)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 5:] = False
    ref = _out_and_grads(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
    got = _out_and_grads(materialized_attention, q, k, v, mask=mask)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_bf16_stays_within_bf16_rounding_of_fp64():
    q, k, v = _qkv(b=2, h=2, t=32, d=16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    low = materialized_attention(*(x.detach().bfloat16() for x in (q, k, v)), is_causal=True)
    assert low.dtype == torch.bfloat16
    sdpa_low = F.scaled_dot_product_attention(*(x.detach().bfloat16() for x in (q, k, v)), is_causal=True)
    err, sdpa_err = (low.double() - ref).abs().max().item(), (sdpa_low.double() - ref).abs().max().item()
    assert err < 0.05 and err < 3 * sdpa_err + 1e-3


def test_dropout_drops_attention_weights_as_f_dropout_does():
    q, k, v = (x.detach() for x in _qkv(dtype=torch.float32))
    torch.manual_seed(7)
    got = materialized_attention(q, k, v, is_causal=True, dropout_p=0.5)
    probs = torch.softmax((q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5 + torch.where(causal_mask(5), 0.0, -torch.inf),
                          dim=-1)
    torch.manual_seed(7)
    expected = F.dropout(probs, 0.5, training=True) @ v
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, materialized_attention(q, k, v, is_causal=True))


def test_mask_and_is_causal_together_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="either mask or is_causal"):
        materialized_attention(q, k, v, mask=causal_mask(5), is_causal=True)


def test_used_while_training_on_cpu_for_small_products_only(monkeypatch):
    monkeypatch.delenv(attention_mod.ATTENTION_ENV, raising=False)
    q, k, _ = _qkv(dtype=torch.float32)
    assert use_materialized(q, k, None)
    assert use_materialized(q, k, causal_mask(5))
    assert not use_materialized(q, k, torch.zeros(1, 1, 5, 5))  # float masks go to SDPA
    assert not use_materialized(q.detach(), k.detach(), None)  # no gradient: inference keeps SDPA
    with torch.no_grad():
        assert not use_materialized(q, k, None)
    for dtype, side in ((torch.float32, 128), (torch.bfloat16, 512)):  # where the benchmark found the crossover
        assert materialize_limit(dtype) == side * side
        q_at, k_at, _ = _qkv(b=1, h=1, t=side, d=2, dtype=dtype)
        assert use_materialized(q_at, k_at, None)
        q_past, k_past, _ = _qkv(b=1, h=1, t=side + 1, d=2, dtype=dtype)
        assert not use_materialized(q_past, k_past, None)
    monkeypatch.setenv(attention_mod.ATTENTION_ENV, "sdpa")
    assert not use_materialized(q, k, None)


def test_the_environment_variable_is_checked():
    assert attention_kernel({}) == "auto"
    assert attention_kernel({"CHATFORGE_ATTENTION": " SDPA "}) == "sdpa"
    with pytest.raises(ValueError, match="CHATFORGE_ATTENTION='flash' is not supported; allowed: auto, sdpa"):
        attention_kernel({"CHATFORGE_ATTENTION": "flash"})


@pytest.mark.parametrize("fused", [False, True])
def test_multihead_attention_trains_through_it_and_answers_as_sdpa(monkeypatch, fused):
    """The module's training forward takes the materialized path (fails on code without it) and its outputs and
    parameter gradients equal those of SDPA's path."""
    monkeypatch.delenv(attention_mod.ATTENTION_ENV, raising=False)
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, dropout=0.0, fused_qkv=fused).double().train()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = padding_mask(torch.tensor([[4, 5, 6, 7, 8, 9], [4, 5, 6, 0, 0, 0]]), 0)
    calls = []
    real = attention_mod.materialized_attention
    monkeypatch.setattr(attention_mod, "materialized_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def run(kernel):
        monkeypatch.setenv(attention_mod.ATTENTION_ENV, kernel)
        mha.zero_grad(set_to_none=True)
        y = mha(x, mask=mask)
        y.pow(2).sum().backward()
        return y.detach(), [p.grad.clone() for p in mha.parameters()]

    y_auto, g_auto = run("auto")
    assert calls, "training attention on CPU did not take the materialized path"
    n = len(calls)
    y_sdpa, g_sdpa = run("sdpa")
    assert len(calls) == n
    torch.testing.assert_close(y_auto, y_sdpa)
    for a, b in zip(g_auto, g_sdpa, strict=True):
        torch.testing.assert_close(a, b)
    mha.eval()
    with torch.no_grad():
        monkeypatch.setenv(attention_mod.ATTENTION_ENV, "auto")
        mha(x, mask=mask)
    assert len(calls) == n  # inference: SDPA
