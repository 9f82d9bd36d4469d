"""The speed paths (issue #3) compute the same numbers as the plain paths they shortcut:
BERT's [CLS]-only last layer, GPT's call-light decode step, and bf16 decoding with autocast's
weight-cast cache."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from chatforge.decoding import GenerationOptions, generate_batch, generate_stream
from chatforge.models.bert import BertConfig, BertForPreTraining, BertForSequenceClassification
from chatforge.models.gpt import GPTConfig, GPTLMHeadModel
from chatforge.registry import SpecialIds

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, unk=3, cls=4, sep=5, mask=6)
VOCAB = 50



def _bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, VOCAB, (3, 9), generator=g)
    ids[:, 0] = SPECIAL.cls
    ids[1, 6:] = SPECIAL.pad  # one padded row, so the key mask is exercised
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return {"input_ids": ids, "token_type_ids": types}


def _bert_cfg() -> BertConfig:
    return BertConfig(d_model=32, n_heads=4, num_layers=2, d_ff=64, dropout=0.1, max_len=16)


def test_bert_cls_only_last_layer_equals_full_path():
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_cfg(), VOCAB, SPECIAL, num_labels=3).eval()
    batch = _bert_batch()
    with torch.no_grad():
        full_h, full_pooled = model.bert(**batch)
        cls_h, cls_pooled = model.bert(**batch, cls_only=True)
        full_logits = model.classifier(full_pooled)
        logits = model(**batch).logits
    assert cls_h.shape == (3, 1, 32) and full_h.shape == (3, 9, 32)
    torch.testing.assert_close(cls_h[:, 0], full_h[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, full_logits, rtol=0, atol=1e-6)


def test_bert_cls_only_gradients_equal_full_path():
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_cfg(), VOCAB, SPECIAL, num_labels=3).eval()
    batch = _bert_batch()
    labels = torch.tensor([0, 2, 1])
    model(**batch, labels=labels).loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    _, pooled = model.bert(**batch)  # every position through every layer
    torch.nn.functional.cross_entropy(model.classifier(pooled), labels).backward()
    slow = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bert_nsp_logits_use_cls_only_path_and_match():
    torch.manual_seed(0)
    model = BertForPreTraining(_bert_cfg(), VOCAB, SPECIAL).eval()
    batch = _bert_batch()
    with torch.no_grad():
        _, pooled = model.bert(**batch)
        torch.testing.assert_close(model.nsp_logits(**batch), model.nsp_head(pooled), rtol=0, atol=1e-6)


def test_cls_only_rejects_pre_ln_layers():
    from chatforge.models.bert.model import _cls_only_layer
    from chatforge.modules import TransformerEncoderLayer

    layer = TransformerEncoderLayer(8, 2, 16, norm_first=True)
    with pytest.raises(ValueError, match="post-LN"):
        _cls_only_layer(layer, torch.zeros(1, 3, 8), None)


def _gpt(variant: str) -> GPTLMHeadModel:
    torch.manual_seed(0)
    cfg = GPTConfig(variant=variant, d_model=32, n_heads=4, n_layers=2, n_positions=64, dropout=0.0,
                    attn_dropout=0.0)
    return GPTLMHeadModel(cfg, VOCAB, SPECIAL, "lm").eval()


@pytest.mark.parametrize("variant", ["gpt", "gpt2"])
def test_gpt_decode_path_equals_module_path(variant):
    # GPTModel.decode (functional calls) against GPTModel.forward with caches, on left-padded rows.
    m = _gpt(variant)
    src = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    a, b = m.init_state(src), m.init_state(src)
    tokens = a.start_tokens
    with torch.no_grad():
        for _ in range(4):
            fast = m.decode_step(tokens, a)
            m.train()  # training mode takes the module path (dropout is 0 here)
            slow = m.decode_step(tokens, b)
            m.eval()
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
            tokens = fast.argmax(-1, keepdim=True)


def test_gpt_decode_rejects_positions_past_n_positions():
    m = _gpt("gpt2")
    state = m.init_state(torch.tensor([[5] * 62]))  # positions 0-60 prefilled, 61 next
    with torch.no_grad():
        m.decode_step(state.start_tokens, state)  # positions 61, 62, 63: the last ones there are
        m.decode_step(torch.tensor([[7]]), state)
        m.decode_step(torch.tensor([[7]]), state)
        with pytest.raises(ValueError, match="n_positions=64"):
            m.decode_step(torch.tensor([[7]]), state)


def _count_casts(fn) -> tuple[object, int]:
    with profile() as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


def test_bf16_cached_generation_equals_uncached_and_casts_weights_once():
    m = _gpt("gpt2")
    prompts = [[5, 6, 7], [9, 10, 11, 12], [13]]
    opts = GenerationOptions(max_new_tokens=12, min_new_tokens=12)

    def run(cache: bool):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
            return generate_batch(m, prompts, opts, bos_id=1, eos_id=2, pad_id=0)

    cached, n_cached = _count_casts(lambda: run(True))
    uncached, n_uncached = _count_casts(lambda: run(False))
    assert cached == uncached
    assert all(len(r) == 12 for r in cached)
    # Without the cache every step re-casts every weight; with it each weight is cast once.
    n_weights = sum(1 for p in m.parameters() if p.dim() == 2)
    assert n_uncached - n_cached >= n_weights * 10


def test_autocast_decoding_leaves_caller_modes_untouched():
    m = _gpt("gpt2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stream = generate_stream(m, [5, 6, 7], GenerationOptions(max_new_tokens=3, min_new_tokens=3),
                                 bos_id=1, eos_id=2)
        got = [next(stream)]
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        got += list(stream)
    assert len(got) == 3
    with torch.inference_mode():
        stream = generate_stream(m, [5, 6, 7], GenerationOptions(max_new_tokens=2), bos_id=1, eos_id=2)
        next(stream)
        assert torch.is_inference_mode_enabled()  # the caller's own mode survives a step


def test_fp32_decoding_still_runs_in_inference_mode():
    seen: list[bool] = []
    m = _gpt("gpt")
    original = m.decode_step

    def spy(tokens, state):
        seen.append(torch.is_inference_mode_enabled())
        return original(tokens, state)

    m.decode_step = spy  # type: ignore[method-assign]
    generate_batch(m, [[5, 6]], GenerationOptions(max_new_tokens=3, min_new_tokens=3), bos_id=1, eos_id=2,
                   pad_id=0)
    assert seen == [True, True, True]


@pytest.mark.parametrize("fused", [False, True])
def test_cached_self_attention_equals_forward_with_cache(fused):
    from chatforge.modules import GrowingKVCache, KVCache, MultiHeadAttention

    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, dropout=0.1, fused_qkv=fused).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 1:3] = False  # masked keys in row 1 (every query still sees key 0)
    a, b = GrowingKVCache(), KVCache()
    with torch.no_grad():
        for t in range(5):
            m = mask[..., : t + 1]
            fast = mha.cached_self_attention(x[:, t : t + 1], a, m)
            slow = mha(x[:, t : t + 1], mask=m, cache=b)
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)
    assert len(a) == len(b) == 5
