"""benchmarks/int8_quality.py's token agreement: position by position over the longer reply."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.benchmarks.conftest import load

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load("int8_quality")


def test_token_agreement_counts_positions_over_the_longer_reply(script):
    fp32 = [[1, 2, 3, 4], [5, 6], [7]]
    int8 = [[1, 2, 9, 4], [5, 6, 8], [7]]
    got = script.token_agreement(fp32, int8)
    # 4 + 3 + 1 positions; differ at one position and one extra token
    assert got["tokens_compared"] == 8
    assert got["position"] == pytest.approx(6 / 8)
    assert got["prefix"] == pytest.approx((2 + 2 + 1) / 8)  # tokens before the first difference
    assert got["exact_replies"] == pytest.approx(1 / 3)
    assert script.token_agreement([[1]], [[1]]) == {"position": 1.0, "prefix": 1.0, "exact_replies": 1.0,
                                                    "tokens_compared": 1}


def test_layer_study_quantizes_exactly_the_named_layer_sets(script, tmp_path, monkeypatch):
    """Also where serving packs fp32 layers for oneDNN (forced here): the study quantizes plain linear layers, so
    a packed one would have stayed fp32 and out of every share."""
    import torch
    from tests.test_bundle import tiny_cfg

    from chatforge.config import validate_config
    from chatforge.inference import load_model
    from chatforge.modules.linear import PackPolicy
    from chatforge.training.run import run_experiment

    run = run_experiment(validate_config(tiny_cfg("generation", tmp_path)), run_dir=tmp_path / "run")
    monkeypatch.setenv("CHATFORGE_FP32_LINEAR", "onednn")  # every linear layer packed, as on an AMD CPU
    monkeypatch.setattr("chatforge.inference.pack_policy", lambda flags: PackPolicy(0, 0, None, "all"))
    got = script.layer_study(run.bundle_dir, max_examples=4)
    assert got["examples"] == 4 and set(got["sets"]) == set(script.LAYER_SETS)
    monkeypatch.setenv("CHATFORGE_FP32_LINEAR", "aten")
    weights = {n: m.weight.numel() for n, m in load_model(run.bundle_dir, "x").model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    total = sum(weights.values())
    ff = sum(v for n, v in weights.items() if ".ff." in n)
    attn = sum(v for n, v in weights.items() if "attn" in n)
    shares = {k: v["linear_weight_share"] for k, v in got["sets"].items()}
    assert shares["all"] == pytest.approx(1.0) == shares["all, 7-bit activations (torch's default)"]
    from chatforge.runtime import int8_dot_products

    bits = {k: v["activation_bits"] for k, v in got["sets"].items()}
    assert bits.pop("all, 7-bit activations (torch's default)") == 7
    assert set(bits.values()) == {8 if int8_dot_products() else 7}  # as serving quantizes them on this CPU
    assert shares["no-attention"] == pytest.approx(1 - attn / total)
    assert shares["no-output"] == pytest.approx(1 - weights["lm_head"] / total)
    assert shares["feed-forward only"] == pytest.approx(ff / total)
    for s in got["sets"].values():
        assert 0.0 <= s["token_agreement"]["position"] <= 1.0 and s["token_agreement"]["tokens_compared"] > 0


def test_backend_quality_scores_every_path_against_torch_fp32(script, tmp_path):
    pytest.importorskip("ctranslate2")
    from chatforge.config import validate_config
    from chatforge.training.run import run_experiment

    cfg = validate_config({
        "name": "tiny-gpt", "seed": 1,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.1},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "gpt", "task": "generation", "variant": "gpt2", "d_model": 32, "n_heads": 2,
                  "n_layers": 1, "n_positions": 64, "dropout": 0.0, "attn_dropout": 0.0},
        "train": {"epochs": 1, "max_steps": 8, "batch_size": 16, "lr": 1e-3, "max_source_len": 20,
                  "max_target_len": 12},
        "tracking": {"enabled": False}, "output": {"dir": str(tmp_path / "runs")},
    })
    run = run_experiment(cfg, run_dir=tmp_path / "run")
    got = script.backend_quality(run.bundle_dir, max_examples=6)
    assert got["examples"] == 6 and set(got["paths"]) == {"torch-int8", "ctranslate2-float32", "ctranslate2-int8"}
    # CTranslate2 float32 runs the same weights and greedy search: token for token torch fp32's replies
    fp32 = got["paths"]["ctranslate2-float32"]
    assert fp32["token_agreement"]["exact_replies"] == 1.0 and fp32["chrf_delta"] == pytest.approx(0.0)
    for p in got["paths"].values():
        assert p["token_agreement"]["tokens_compared"] > 0 and 0.0 <= p["token_agreement"]["position"] <= 1.0


def test_margin_study_follows_fp32s_own_greedy_replies_through_the_step_path(script, tmp_path):
    """fp32's step path, fed its own greedy tokens, picks them again at every step (so the margins are the ones the
    served replies were chosen with), and more replies have a near-tie below a larger level."""
    from tests.test_bundle import tiny_cfg

    from chatforge.config import validate_config
    from chatforge.decoding import GenerationOptions
    from chatforge.inference import load_model
    from chatforge.training.run import load_splits, run_experiment

    run = run_experiment(validate_config(tiny_cfg("generation", tmp_path)), run_dir=tmp_path / "run")
    got = script.margin_study(run.bundle_dir, max_examples=5)
    fp32 = load_model(run.bundle_dir, "x")
    cfg = fp32.bundle.config
    test = load_splits(cfg)[2][:5]
    opts = GenerationOptions(max_new_tokens=cfg.train.max_target_len)
    assert got["examples"] == len(test) > 0
    assert got["steps"] == sum(len(list(fp32.stream(ex.text, opts))) for ex in test)
    assert got["steps_where_fp32_step_path_disagrees_with_its_stream"] == 0
    below = [got["fp32_margin"]["share_of_replies_with_a_step_below"][str(x)] for x in script.MARGIN_LEVELS]
    assert below == sorted(below) and all(0.0 <= b <= 1.0 for b in below)
    flips = got["share_of_replies_int8_would_flip_at_error_scale"]
    assert set(flips) == {str(s) for s in script.ERROR_SCALES}
    assert all(0.0 <= f <= 1.0 for f in flips.values())
    assert got["int8_margin_error"]["median"] >= 0.0 and got["int8_margin_error"]["max"] > 0.0
