"""Serving precision: ``chatforge serve --precision bf16`` casts torch weights once and runs them
under bf16 autocast, on every path a served model takes (single stream, continuous batching,
classification). Checked against the same bundles in fp32: the numbers move by bf16 rounding only.
``--precision int8`` quantizes the linear layers of every torch family serving loads; its outputs are
checked against fp32 within int8's error, on the same paths; ``auto`` picks from the CPU's flags.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.config import validate_config
from chatforge.decoding import GenerationOptions
from chatforge.inference import load_model
from chatforge.serving.engine import Engine, ReplyDone
from chatforge.serving.repository import ModelDirectory
from chatforge.training.run import run_experiment

TEXTS = ["안녕하세요", "오늘 날씨 어때요", "배고파요", "영화 보러 갈래요", "심심해"]


TRANSFORMER = {"family": "transformer", "d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0,
               "num_encoder_layers": 1, "num_decoder_layers": 1}
ELMO = {"family": "elmo", "max_chars": 8, "char_embed_dim": 8, "filters": [[1, 8], [2, 8]], "num_highway": 1,
        "projection_dim": 16, "lstm_hidden": 16, "dropout": 0.0}
# Every torch family serving loads, by the task it is served for.
FAMILIES = {
    "transformer-generation": {**TRANSFORMER, "task": "generation"},
    "transformer-classification": {**TRANSFORMER, "task": "classification"},
    "gpt-generation": {"family": "gpt", "task": "generation", "d_model": 32, "n_heads": 2, "n_layers": 1,
                       "n_positions": 64, "dropout": 0.0, "attn_dropout": 0.0},
    "bert-classification": {"family": "bert", "task": "classification", "d_model": 32, "n_heads": 2,
                            "num_layers": 1, "d_ff": 64, "dropout": 0.0, "max_len": 32},
    "elmo-classification": {**ELMO, "task": "classification"},
    "bytenet-generation": {"family": "bytenet", "task": "generation", "d_model": 32, "max_dilation": 2,
                           "encoder_sets": 1, "decoder_sets": 1, "dropout": 0.0},
    # LSTMs with a projection (lstm_hidden != projection_dim), which torch's quantized LSTM lacks
    "elmo-projected": {**ELMO, "task": "classification", "lstm_hidden": 32},
}


def _train(tmp: Path, task: str, model: dict | None = None, key: str | None = None) -> Path:
    key = key or task
    tree = {
        "name": f"precision-{key}",
        "seed": 0,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.0},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": model or {**TRANSFORMER, "task": task},
        "train": {"epochs": 1, "max_steps": 20, "batch_size": 16, "lr": 3e-3, "max_source_len": 24,
                  "max_target_len": 24},
        "output": {"dir": str(tmp / "runs")},
        "tracking": {"enabled": False},
    }
    return run_experiment(validate_config(tree), run_dir=tmp / f"run-{key}").bundle_dir


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("precision")
    return {"generation": _train(tmp, "generation"), "classification": _train(tmp, "classification")}


def test_bf16_casts_torch_weights_once_at_load(bundles):
    fp32 = load_model(bundles["generation"], "chat")
    bf16 = load_model(bundles["generation"], "chat", precision="bf16")
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.info.metadata["precision"] == "bf16" and "precision" not in fp32.info.metadata


def test_bf16_classifier_matches_fp32_within_rounding(bundles):
    fp32 = load_model(bundles["classification"], "intent")
    bf16 = load_model(bundles["classification"], "intent", precision="bf16")
    p32, p16 = fp32.predict_proba(TEXTS), bf16.predict_proba(TEXTS)
    assert p16.dtype == np.float32 and p16.shape == p32.shape
    assert np.allclose(p16.sum(1), 1.0, atol=1e-4)
    assert np.abs(p16 - p32).max() < 0.05  # bf16 keeps 8 bits of mantissa; a wrong path would not be close


def test_bf16_decoding_logits_match_fp32_on_both_paths(bundles):
    """The single-stream path (decoding.py) and the continuous batcher's step model both run bf16."""
    from chatforge.models.transformer import Seq2SeqStepModel

    fp32 = load_model(bundles["generation"], "chat")
    bf16 = load_model(bundles["generation"], "chat", precision="bf16")
    prompts = [fp32.tok.encode(t) for t in TEXTS]
    out = {}
    for name, gen in (("fp32", fp32), ("bf16", bf16)):
        step = Seq2SeqStepModel(gen.model)
        state, logits = step.prefill(prompts, gen.tok.bos_id)
        nxt = step.step(state, logits.argmax(-1))
        assert logits.dtype == nxt.dtype == torch.float32  # handed to sampling as fp32
        out[name] = (logits, nxt)
    for a, b in zip(out["fp32"], out["bf16"], strict=True):
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert cos.min() > 0.99, cos
    opts = GenerationOptions(max_new_tokens=6, min_new_tokens=6)
    assert len(list(bf16.stream(TEXTS[0], opts))) == 6


def test_bf16_engine_streams_concurrent_replies(bundles):
    engine = Engine.from_bundles({"chat": bundles["generation"], "intent": bundles["classification"]},
                                 precision="bf16", max_running=4)

    async def main():
        async def one(text):
            items = [item async for item in engine.stream_reply(text, GenerationOptions(max_new_tokens=5,
                                                                                          min_new_tokens=5))]
            return items

        replies = await asyncio.gather(*(one(t) for t in TEXTS[:4]))
        preds = await engine.classify(TEXTS)
        return replies, preds

    try:
        replies, preds = asyncio.run(main())
    finally:
        engine.close()
    for items in replies:
        assert isinstance(items[-1], ReplyDone) and items[-1].completion_tokens == 5
        assert len(items) == 6
    assert len(preds) == len(TEXTS) and all(0.0 <= p.score <= 1.0 for p in preds)


def test_unknown_precision_is_refused_with_the_allowed_values(bundles, tmp_path):
    with pytest.raises(ValueError, match=r"precision='fp16' is not supported; allowed: fp32, bf16, int8, auto"):
        load_model(bundles["generation"], "chat", precision="fp16")
    with pytest.raises(ValueError, match="allowed: fp32, bf16, int8, auto"):
        ModelDirectory(tmp_path, precision="int4")
    with pytest.raises(ValueError, match="allowed: fp32, bf16, int8, auto"):
        Engine.from_bundles({"chat": bundles["generation"]}, precision="half")


def test_bf16_runs_under_autocast_on_every_serving_path(bundles):
    """Every path a served model takes (the batcher's prefill and step, a single stream resumed
    from any thread, classification) runs under bf16 autocast, which casts any fp32 activation or
    buffer a family mixes in for the matmuls (and, on CUDA, keeps norms and softmax in fp32)."""
    from chatforge.models.transformer import Seq2SeqStepModel

    seen: list[bool] = []

    def watch(model):
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert layers
        return [m.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu"))) for m in layers]

    gen = load_model(bundles["generation"], "chat", precision="bf16")
    cls = load_model(bundles["classification"], "intent", precision="bf16")
    fp32 = load_model(bundles["classification"], "intent")
    hooks = watch(gen.model) + watch(cls.model)
    try:
        step = Seq2SeqStepModel(gen.model)
        state, logits = step.prefill([gen.tok.encode(TEXTS[0])], gen.tok.bos_id)
        step.step(state, logits.argmax(-1))
        list(gen.stream(TEXTS[1], GenerationOptions(max_new_tokens=2, min_new_tokens=2)))
        cls.predict_proba(TEXTS[:2])
        n = len(seen)
        hooks += watch(fp32.model)
        fp32.predict_proba(TEXTS[:2])  # fp32 models: no autocast
    finally:
        for h in hooks:
            h.remove()
    assert n > 0 and all(seen[:n]) and not any(seen[n:]) and len(seen) > n


def test_model_directory_loads_and_hot_swaps_every_version_at_its_precision(bundles, tmp_path):
    """``serve --model-dir DIR --precision bf16``: the first load and each hot-swapped version alike."""
    import shutil

    from chatforge.serving.repository import ModelDirectoryWatcher

    root = tmp_path / "models"
    shutil.copytree(bundles["generation"], root / "chat" / "1")
    directory = ModelDirectory(root, precision="bf16")
    engine = directory.load_engine()
    try:
        dtypes = lambda: {p.dtype for p in engine._slots()[0].model.model.parameters()}  # noqa: E731
        assert dtypes() == {torch.bfloat16}
        shutil.copytree(bundles["generation"], root / "chat" / "2")
        watcher = ModelDirectoryWatcher(engine, directory, poll_interval=60)
        assert watcher.check_once() == ["chat"] and engine.version_of("chat") == "2"
        assert dtypes() == {torch.bfloat16}
    finally:
        engine.close()


# ---------------------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def family_bundles(tmp_path_factory, bundles) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("int8")
    out = {"transformer-generation": bundles["generation"], "transformer-classification": bundles["classification"]}
    for key, model in FAMILIES.items():
        if key not in out:
            out[key] = _train(tmp, model["task"], model, key)
    return out


SERVED = [k for k in FAMILIES if k != "elmo-projected"]


@pytest.mark.parametrize("key", SERVED)
def test_int8_quantizes_the_linear_layers_and_keeps_embeddings_fp32(family_bundles, key):
    from torch.ao.nn.quantized.dynamic import LSTM as QLSTM
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    fp32 = load_model(family_bundles[key], "m")
    int8 = load_model(family_bundles[key], "m", precision="int8")
    from chatforge.modules import PackedLinear  # fp32 on AMD CPUs: linear layers packed for oneDNN

    n_linear = sum(isinstance(m, torch.nn.Linear | PackedLinear) for m in fp32.model.modules())
    assert n_linear > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.model.modules())  # every one replaced
    assert sum(isinstance(m, QLinear) for m in int8.model.modules()) == n_linear
    if key.startswith("elmo"):  # its unprojected LSTMs too
        assert any(isinstance(m, QLSTM) for m in int8.model.modules())
    embeddings = [m for m in int8.model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(m.weight.dtype == torch.float32 for m in embeddings)
    assert int8.info.metadata["precision"] == "int8" and "precision" not in fp32.info.metadata


@pytest.mark.parametrize("key", [k for k in SERVED if k.endswith("classification")])
def test_int8_classifiers_match_fp32_within_int8_error(family_bundles, key):
    fp32 = load_model(family_bundles[key], "m")
    int8 = load_model(family_bundles[key], "m", precision="int8")
    p32, p8 = fp32.predict_proba(TEXTS), int8.predict_proba(TEXTS)
    assert p8.shape == p32.shape and np.allclose(p8.sum(1), 1.0, atol=1e-4)
    diff = np.abs(p8 - p32).max()
    assert 0 < diff < 0.02, diff  # quantized (not the fp32 path), and close
    top2 = np.sort(p32, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * diff  # argmax can only move where fp32's margin is within the error
    assert (p8.argmax(1) == p32.argmax(1))[clear].all()


def _teacher_forced_logits(gen, text: str, tokens: list[int]) -> torch.Tensor:
    """The decoding-cache path (init_state/decode_step, what a single stream runs) fed the same tokens."""
    from chatforge.decoding import _start_tokens

    src = torch.tensor([gen.tok.encode(text)])
    with torch.inference_mode():
        state = gen.model.init_state(src, use_cache=True)
        nxt = _start_tokens(state, src, gen.tok.bos_id)
        out = []
        for tok in tokens:
            out.append(gen.model.decode_step(nxt, state).float()[0])
            nxt = torch.tensor([[tok]])
    return torch.stack(out)


@pytest.mark.parametrize("key", ["transformer-generation", "gpt-generation", "bytenet-generation"])
def test_int8_decoding_logits_match_fp32(family_bundles, key):
    fp32 = load_model(family_bundles[key], "chat")
    int8 = load_model(family_bundles[key], "chat", precision="int8")
    for text in TEXTS[:3]:
        ref = list(fp32.stream(text, GenerationOptions(max_new_tokens=6, min_new_tokens=6)))
        tokens = [d.token_id for d in ref]
        a, b = _teacher_forced_logits(fp32, text, tokens), _teacher_forced_logits(int8, text, tokens)
        assert not torch.equal(a, b)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert cos.min() > 0.99, cos
    assert len(list(int8.stream(TEXTS[0], GenerationOptions(max_new_tokens=6, min_new_tokens=6)))) == 6


def test_int8_step_model_matches_fp32_for_continuous_batching(family_bundles):
    from chatforge.models.transformer import Seq2SeqStepModel

    fp32 = load_model(family_bundles["transformer-generation"], "chat")
    int8 = load_model(family_bundles["transformer-generation"], "chat", precision="int8")
    prompts = [fp32.tok.encode(t) for t in TEXTS]
    out = {}
    for name, gen in (("fp32", fp32), ("int8", int8)):
        step = Seq2SeqStepModel(gen.model)
        state, logits = step.prefill(prompts, gen.tok.bos_id)
        out[name] = (logits, step.step(state, out["fp32"][0].argmax(-1) if out else logits.argmax(-1)))
    for a, b in zip(out["fp32"], out["int8"], strict=True):
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert cos.min() > 0.99, cos


def test_int8_engine_batches_streams_cancels_and_classifies(family_bundles):
    from contextlib import aclosing

    engine = Engine.from_bundles({"chat": family_bundles["transformer-generation"],
                                  "gpt": family_bundles["gpt-generation"],
                                  "intent": family_bundles["bert-classification"]},
                                 precision="int8", max_running=4)
    assert engine.runner_kind("chat") == "continuous"
    opts = GenerationOptions(max_new_tokens=5, min_new_tokens=5)

    async def main():
        async def one(text, model):
            return [item async for item in engine.stream_reply(text, opts, model)]

        replies = await asyncio.gather(*(one(t, "chat") for t in TEXTS[:4]), one(TEXTS[4], "gpt"))
        # A client that goes away mid-reply: its row leaves the running batch, the engine serves on.
        async with aclosing(engine.stream_reply(TEXTS[0], GenerationOptions(max_new_tokens=500), "chat")) as s:
            await s.__anext__()
        after = await one(TEXTS[1], "chat")
        preds = await engine.classify(TEXTS, "intent")
        return replies, after, preds

    try:
        replies, after, preds = asyncio.run(main())
        assert engine.wait_idle(10)
        assert engine.cancelled == 1
    finally:
        engine.close()
    for items in [*replies, after]:
        assert isinstance(items[-1], ReplyDone) and items[-1].completion_tokens == 5 and len(items) == 6
    assert len(preds) == len(TEXTS) and all(0.0 <= p.score <= 1.0 for p in preds)


def test_int8_is_refused_with_the_family_and_allowed_precisions_where_it_does_not_apply(family_bundles):
    with pytest.raises(ValueError, match=r"precision int8 does not apply to family 'elmo'.*"
                                         r"allowed for elmo: fp32, bf16, auto"):
        load_model(family_bundles["elmo-projected"], "intent", precision="int8")


def test_auto_picks_from_the_cpu_flags_the_width_and_the_family(family_bundles, monkeypatch):
    from chatforge import runtime

    monkeypatch.setattr(runtime, "read_cpu_flags", lambda *a: ("cpu", {"avx512_vnni", "amx_bf16"}))
    bert = family_bundles["bert-classification"]
    assert "precision" not in load_model(bert, "m", precision="auto").info.metadata  # 32 wide: too narrow, fp32
    monkeypatch.setattr(runtime, "INT8_MIN_WIDTH", 16)  # the tiny models' width
    assert load_model(bert, "m", precision="auto").info.metadata["precision"] == "int8"
    assert load_model(family_bundles["elmo-projected"], "m", precision="auto").info.metadata["precision"] == "bf16"
    monkeypatch.setattr(runtime, "read_cpu_flags", lambda *a: ("cpu", {"avx2"}))  # AVX2 alone: FBGEMM's int8 kernels
    assert load_model(bert, "m", precision="auto").info.metadata["precision"] == "int8"
    assert "precision" not in load_model(family_bundles["elmo-projected"], "m", precision="auto").info.metadata
    monkeypatch.setattr(runtime, "read_cpu_flags", lambda *a: ("cpu", set()))  # no AVX2: not measured, fp32
    assert "precision" not in load_model(bert, "m", precision="auto").info.metadata


def test_the_fp32_kernel_log_says_why_a_small_model_keeps_torchs_matmul(bundles, monkeypatch, caplog):
    """A model too small to pack was logged as "oneDNN's op unavailable", which sent an operator looking for a
    broken torch build (seen in the serving image, whose torch has the op)."""
    from chatforge import runtime
    from chatforge.modules import onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear op: the other branch of the message")
    monkeypatch.setattr(runtime, "fp32_linear_kernels", lambda: ("onednn", "chosen by the test"))
    monkeypatch.setattr(runtime, "read_cpu_flags", lambda *a: ("cpu", {"avx2"}))  # the AVX2 packing policy
    with caplog.at_level(logging.INFO, logger="chatforge.inference"):
        load_model(bundles["generation"], name="tiny")
    (line,) = [r.getMessage() for r in caplog.records if "fp32 linear layers of tiny" in r.getMessage()]
    assert "(0 packed; chosen by the test)" in line and "unavailable" not in line
    assert "no linear layer has the 262,144 weights" in line


def _quantized_pair(flags: set[str]):
    """A two-layer model quantized by ``quantize_int8`` as a CPU with ``flags`` would get it, and its fp32 twin."""
    import copy

    from chatforge import inference

    torch.manual_seed(0)
    fp32 = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()
    int8 = copy.deepcopy(fp32)
    real = inference.runtime.int8_dot_products
    inference.runtime.int8_dot_products = lambda f=None: real(flags if f is None else f)
    try:
        inference.quantize_int8(int8, "test")
    finally:
        inference.runtime.int8_dot_products = real
    return fp32, int8


def test_int8_activations_use_all_8_bits_where_the_cpu_has_int8_dot_products():
    """torch's dynamic linear layer always quantizes activations to 7 bits (``reduce_range=True``); with VNNI/AMX
    chatforge's use 8 (fails on the old code, which kept torch's 7 everywhere)."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    fp32, vnni = _quantized_pair({"avx512_vnni"})
    _, avx2 = _quantized_pair({"avx2"})
    first = vnni[0]
    exact8 = torch.ops.quantized.linear_dynamic(x, first._packed_params._packed_params, reduce_range=False)
    exact7 = torch.ops.quantized.linear_dynamic(x, first._packed_params._packed_params, reduce_range=True)
    assert not torch.equal(exact8, exact7)  # the two really differ on this input
    with torch.no_grad():
        assert torch.equal(vnni[0](x), exact8)
        assert torch.equal(avx2[0](x), exact7)  # no int8 dot products: torch's 7-bit path stays
        ref = fp32(x)
        err8, err7 = (vnni(x) - ref).abs().mean().item(), (avx2(x) - ref).abs().mean().item()
    assert err8 < 0.75 * err7  # the eighth bit halves the activation rounding step
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    assert all(isinstance(m, QLinear) for m in (vnni[0], vnni[2], avx2[0]))  # still torch's int8 layers
    assert "full range" in repr(vnni) and "full range" not in repr(avx2)
