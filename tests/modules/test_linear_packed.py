"""fp32 linear layers on oneDNN for serving (``modules.PackedLinear``, ``pack_linear_layers``) and the choice that
turns it on (``runtime.fp32_linear_kernels``, ``inference.load_model``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chatforge import runtime
from chatforge.modules import PackedLinear, apply_linear, linear_fn, pack_linear_layers
from chatforge.modules import linear as linear_mod

needs_onednn = pytest.mark.skipif(linear_mod._onednn_linear() is None, reason="this torch build has no oneDNN linear op")


@needs_onednn
@pytest.mark.parametrize("policy", [linear_mod.PACK_AVX2, linear_mod.PACK_AVX512])
@pytest.mark.parametrize("rows", [1, 8, linear_mod.PACK_MAX_ROWS, linear_mod.PACK_MAX_ROWS + 1, 300])
def test_packed_layer_computes_the_linear_layer(rows, policy):
    torch.manual_seed(0)
    layer = nn.Linear(512, 600)
    packed = PackedLinear(layer, linear_mod._onednn_linear(), policy)
    x = torch.randn(rows, 1, 512)  # decode steps pass (B, 1, D)
    with torch.inference_mode():
        want = layer(x)
        for got in (packed(x), linear_fn(packed)(x), apply_linear(packed, x)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert packed.weight is layer.weight and packed.bias is layer.bias  # readers of .weight keep working


@needs_onednn
@pytest.mark.parametrize(("policy", "to_onednn"), [
    (linear_mod.PACK_AVX2, {1: True, 8: True, 64: True, 65: False, 600: False}),  # a few rows: decoding steps
    (linear_mod.PACK_AVX512, {1: False, 3: False, 4: True, 64: True, 600: True}),  # from 1 M multiply-adds, any rows
])
def test_each_policy_sends_the_calls_it_names_to_onednn(policy, to_onednn):
    op = linear_mod._onednn_linear()
    called = []

    def counting(*args):
        called.append(args[0].shape[0])
        return op(*args)

    layer = nn.Linear(256, 1024)  # 262,144 multiply-adds per row
    packed = PackedLinear(layer, counting, policy)
    with torch.inference_mode():
        for rows, want in to_onednn.items():
            called.clear()
            x = torch.randn(rows, 256)
            torch.testing.assert_close(packed(x), layer(x), atol=1e-4, rtol=1e-5)
            assert bool(called) == want, (rows, called)


@needs_onednn
def test_one_row_calls_of_a_widening_layer_read_its_transposed_copy():
    """A lone stream's decode step is one row: under the AVX-512 policy a layer with at least as many outputs as
    inputs computes it as ``x @ W^T`` on a copy stored inputs x outputs (faster to stream than the row-by-row
    read of F.linear and oneDNN); other row counts, narrowing layers and the AVX2 policy are as before."""
    op = linear_mod._onednn_linear()
    called = []

    def counting(*args):
        called.append(args[0].shape[0])
        return op(*args)

    torch.manual_seed(0)
    widening, narrowing = nn.Linear(256, 1024), nn.Linear(1024, 256)
    packed = PackedLinear(widening, counting, linear_mod.PACK_AVX512)
    assert packed.transposed.shape == (256, 1024) and packed.transposed.is_contiguous()
    assert not hasattr(PackedLinear(narrowing, op, linear_mod.PACK_AVX512), "transposed")
    assert hasattr(PackedLinear(nn.Linear(256, 256), op, linear_mod.PACK_AVX512), "transposed")  # square: too
    assert not hasattr(PackedLinear(widening, op, linear_mod.PACK_AVX2), "transposed")
    no_bias = nn.Linear(256, 1024, bias=False)
    with torch.inference_mode():
        want = torch.addmm(widening.bias, torch.ones(1, 256), widening.weight.t().contiguous())
        for shape in ((256,), (1, 256), (1, 1, 256)):  # a vector, a row, a decode step's (B, 1, D)
            x = torch.ones(shape)
            got = packed(x)
            assert got.shape == widening(x).shape
            assert torch.equal(got.reshape(1, -1), want)  # this product, not F.linear's
            torch.testing.assert_close(got, widening(x), atol=1e-4, rtol=1e-5)
        x = torch.randn(1, 256)
        torch.testing.assert_close(PackedLinear(no_bias, op, linear_mod.PACK_AVX512)(x), no_bias(x),
                                   atol=1e-4, rtol=1e-5)
        assert called == []  # one row never went to oneDNN
        packed(torch.randn(4, 256))
        assert called == [4]


def test_the_policy_follows_the_cpus_vector_width():
    assert linear_mod.pack_policy({"avx2", "fma"}) is linear_mod.PACK_AVX2
    assert linear_mod.pack_policy({"avx2", "avx512f", "avx512_bf16"}) is linear_mod.PACK_AVX512


@needs_onednn
def test_only_large_fp32_layers_are_packed():
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 128), nn.Linear(128, 128, bias=False))
    bf16 = nn.Linear(512, 1024).to(torch.bfloat16)
    model.append(bf16)
    assert pack_linear_layers(model) == 1  # 256 x 1024 only: 1024 x 128 and 128 x 128 are below the bar, bf16 stays
    assert isinstance(model[0], PackedLinear) and type(model[2]) is nn.Linear and model[4] is bf16
    assert pack_linear_layers(nn.Sequential(nn.Linear(8, 8)), min_weights=0) == 1


def test_nothing_is_packed_without_the_op(monkeypatch):
    monkeypatch.setattr(linear_mod, "_onednn_linear", lambda: None)
    model = nn.Sequential(nn.Linear(512, 1024))
    assert pack_linear_layers(model) == 0 and type(model[0]) is nn.Linear


def test_fp32_linear_choice():
    amd, intel = "AMD EPYC 7B13", "Intel(R) Xeon(R) Processor"
    assert runtime.fp32_linear_kernels({}, amd)[0] == "onednn"
    assert runtime.fp32_linear_kernels({}, intel)[0] == "aten"  # not measured there: torch's own path stays
    assert runtime.fp32_linear_kernels({"CHATFORGE_FP32_LINEAR": "aten"}, amd) == ("aten", "CHATFORGE_FP32_LINEAR=aten")
    assert runtime.fp32_linear_kernels({"CHATFORGE_FP32_LINEAR": "oneDNN"}, intel)[0] == "onednn"
    with pytest.raises(ValueError, match=r"CHATFORGE_FP32_LINEAR='mkl' is not supported; allowed: auto, onednn, aten"):
        runtime.fp32_linear_kernels({"CHATFORGE_FP32_LINEAR": "mkl"}, amd)


@needs_onednn
@pytest.mark.parametrize("flags", ["avx2", "avx512f"])
def test_served_gpt_fp32_packs_its_output_layer_and_answers_as_before(tmp_path, monkeypatch, flags):
    from chatforge.bench.cases import sample_texts
    from chatforge.bundle import build_from_config, save_bundle
    from chatforge.config import validate_config
    from chatforge.decoding import GenerationOptions
    from chatforge.inference import load_model
    from chatforge.tokenizer import Tokenizer

    cfg = validate_config({"name": "packed", "data": {"path": "bench"}, "tracking": {"enabled": False},
                           "model": {"family": "gpt", "task": "generation", "d_model": 256, "n_heads": 4,
                                     "n_layers": 1, "n_positions": 64, "init_std": 0.3},
                           "train": {"max_source_len": 24}}, source="test")
    tok = Tokenizer.train(sample_texts(), vocab_size=1100)
    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "b", model=build_from_config(cfg, tok, None).eval(), tokenizer=tok, config=cfg,
                         labels=None)
    monkeypatch.setattr(runtime, "read_cpu_flags", lambda *a: ("cpu", {"avx2", flags}))
    served = {}
    for kernels in ("aten", "onednn"):
        monkeypatch.setenv("CHATFORGE_FP32_LINEAR", kernels)
        served[kernels] = load_model(bundle, "g")
    packed = [m for m in served["onednn"].model.modules() if isinstance(m, PackedLinear)]
    if flags == "avx2":
        # the feed-forward (256 x 1024, at the bar) and output (256 x 1,100) layers; not qkv (256 x 768) or out (256 x 256)
        assert sorted((m.in_features, m.out_features) for m in packed) == [(256, 1024), (256, 1100), (1024, 256)]
    else:  # AVX-512: every layer from 128 x 128 weights
        assert sorted((m.in_features, m.out_features) for m in packed) == [
            (256, 256), (256, 768), (256, 1024), (256, 1100), (1024, 256)]
        assert {m.policy.name for m in packed} == {"avx512"}
        # a generator's decode steps make one-row calls: the widening and square layers keep a transposed copy
        assert sorted((m.in_features, m.out_features) for m in packed if hasattr(m, "transposed")) == [
            (256, 256), (256, 768), (256, 1024), (256, 1100)]
    assert not any(isinstance(m, PackedLinear) for m in served["aten"].model.modules())
    assert served["onednn"].info.metadata.get("fp32_linear") == "onednn"
    assert "fp32_linear" not in served["aten"].info.metadata
    opts = GenerationOptions(max_new_tokens=12)
    for text in ("안녕하세요", "오늘 날씨 어때"):
        a = [d.token_id for d in served["aten"].stream(text, opts)]
        b = [d.token_id for d in served["onednn"].stream(text, opts)]
        assert a == b and len(set(a)) > 1


@needs_onednn
def test_a_served_classifier_keeps_no_transposed_copies(tmp_path, monkeypatch):
    """Only generators make one-row calls (decode steps): a classifier reads whole texts, so the copies would be
    memory held for nothing (a BERT-base classifier's widening layers are two thirds of its weights)."""
    from chatforge.bench.cases import sample_texts
    from chatforge.bundle import build_from_config, save_bundle
    from chatforge.config import validate_config
    from chatforge.inference import load_model
    from chatforge.tokenizer import Tokenizer

    cfg = validate_config({"name": "clf", "data": {"path": "bench"}, "tracking": {"enabled": False},
                           "model": {"family": "gpt", "task": "classification", "d_model": 256, "n_heads": 4,
                                     "n_layers": 1, "n_positions": 64},
                           "train": {"max_source_len": 24}}, source="test")
    tok = Tokenizer.train(sample_texts(), vocab_size=1100)
    labels = ["a", "b"]
    bundle = save_bundle(tmp_path / "b", model=build_from_config(cfg, tok, labels).eval(), tokenizer=tok,
                         config=cfg, labels=labels)
    monkeypatch.setattr(runtime, "read_cpu_flags", lambda *a: ("cpu", {"avx2", "avx512f"}))
    monkeypatch.setenv("CHATFORGE_FP32_LINEAR", "onednn")
    served = load_model(bundle, "c")
    packed = [m for m in served.model.modules() if isinstance(m, PackedLinear)]
    assert packed and not any(hasattr(m, "transposed") for m in packed)
    assert served.classify(["안녕하세요"])[0].label in labels
