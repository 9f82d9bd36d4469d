"""Serving precision: ``chatforge serve --precision bf16`` casts torch weights once and runs them
under bf16 autocast, on every path a served model takes (single stream, continuous batching,
classification). Checked against the same bundles in fp32: the numbers move by bf16 rounding only.
"""

from __future__ import annotations

import asyncio
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


def _train(tmp: Path, task: str) -> Path:
    tree = {
        "name": f"precision-{task}",
        "seed": 0,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.0},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "transformer", "task": task, "d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0,
                  "num_encoder_layers": 1, "num_decoder_layers": 1},
        "train": {"epochs": 1, "max_steps": 20, "batch_size": 16, "lr": 3e-3, "max_source_len": 24,
                  "max_target_len": 24},
        "output": {"dir": str(tmp / "runs")},
        "tracking": {"enabled": False},
    }
    return run_experiment(validate_config(tree), run_dir=tmp / f"run-{task}").bundle_dir


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
    with pytest.raises(ValueError, match=r"precision='fp16' is not supported; allowed: fp32, bf16"):
        load_model(bundles["generation"], "chat", precision="fp16")
    with pytest.raises(ValueError, match="allowed: fp32, bf16"):
        ModelDirectory(tmp_path, precision="int8")
    with pytest.raises(ValueError, match="allowed: fp32, bf16"):
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
