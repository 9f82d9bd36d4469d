"""benchmarks/served_generation.py: its arithmetic (medians, ratios, agreement) and, marked slow, a tiny run
end to end (four real servers and the direct CTranslate2 anchors) that writes its report."""

from __future__ import annotations

import json

import pytest
from tests.benchmarks.conftest import load


@pytest.fixture(scope="module")
def script():
    return load("served_generation")


def _rep(tps: float, ttft: float) -> dict:
    return {"tokens_per_s": tps, "ttft_ms": ttft}


def test_medians_and_ratios(script):
    runs = {"chatforge-ct2-int8": {"1 stream": [_rep(100, 10), _rep(300, 30), _rep(200, 20)],
                                   "concurrent": [_rep(800, 40)]},
            "ct2-direct-int8": {"1 stream": [_rep(400, 5)], "concurrent": [_rep(1000, 20)]}}
    rows = script.summarize(runs)
    by = {(r["engine"], r["case"]): r for r in rows}
    assert by[("chatforge-ct2-int8", "1 stream")]["tokens_per_s"] == 200  # the median, not the mean or last
    assert by[("chatforge-ct2-int8", "1 stream")]["reps_tokens_per_s"] == [100, 300, 200]
    got = {(r["case"], r["chatforge"], r["anchor"]): r for r in script.ratios(rows)}
    assert set(got) == {("1 stream", "chatforge-ct2-int8", "ct2-direct-int8"),
                        ("concurrent", "chatforge-ct2-int8", "ct2-direct-int8")}
    one = got[("1 stream", "chatforge-ct2-int8", "ct2-direct-int8")]
    assert one["tokens_per_s"] == 0.5 and one["ttft"] == 0.25  # 200/400; 5 ms / 20 ms
    assert one["best_tokens_per_s"] == 0.75  # 300/400: each engine's best repetition
    assert got[("concurrent", "chatforge-ct2-int8", "ct2-direct-int8")]["ttft"] == 0.5


def test_bf16_is_served_only_where_the_cpu_computes_it(script):
    assert script.BF16_ENGINE[0] not in script.served_engines(False)
    with_bf16 = script.served_engines(True)
    assert with_bf16[script.BF16_ENGINE[0]] == ("torch", "bf16") and set(script.SERVED) < set(with_bf16)
    # and a bf16 row gets its ratios against the anchors like the others
    runs = {"chatforge-torch-bf16": {"1 stream": [_rep(100, 10)]}, "ct2-direct-float32": {"1 stream": [_rep(200, 5)]}}
    got = script.ratios(script.summarize(runs))
    assert [(r["chatforge"], r["anchor"], r["tokens_per_s"]) for r in got] == [
        ("chatforge-torch-bf16", "ct2-direct-float32", 0.5)]


def test_agreement_against_the_reference(script):
    ids = {"chatforge-torch-fp32": [[1, 2, 3, 4], [5, 6]], "x": [[1, 2, 9, 4], [5, 6]]}
    assert script.agreement(ids) == {"x": {"identical_replies": 0.5, "prefix_tokens": round(4 / 6, 4)}}


def test_rebuild_recomputes_the_report_from_raw_repetitions(script, tmp_path):
    raw = {"chatforge-ct2-int8": {"1 stream": [_rep(100, 10), _rep(300, 30)], "concurrent": [_rep(800, 40)]},
           "ct2-direct-int8": {"1 stream": [_rep(400, 5)], "concurrent": [_rep(1000, 20)]}}
    stale = {"created": "x", "loaded": False, "agreement": {}, "raw": raw, "rows": [], "ratios": [],
             "config": {"model": "m", "new_tokens": 4, "prompts": "p", "reps": 2},
             "machine": {"lscpu_model": "cpu", "cpu": {"available_cpus": 2}, "load_before": [0.1],
                         "load_after": [0.2]}}
    (tmp_path / "served-generation.json").write_text(json.dumps(stale))
    got = script.rebuild(tmp_path)
    assert {(r["engine"], r["case"]) for r in got["rows"]} == {(e, c) for e in raw for c in script.CASES}
    assert "| 1 stream | chatforge-ct2-int8 | ct2-direct-int8 | 0.50x | 0.75x |" in (
        tmp_path / "served-generation.md").read_text()


def test_transformer_full_size_is_the_configs_shape(script):
    # --family transformer times a bundle of configs/chatbot_kr_transformer.yaml's shape: a change there shows here.
    import yaml

    fam = script.FAMILIES["transformer"]
    cfg = yaml.safe_load(fam.config.read_text())
    model = {k: v for k, v in fam.model(fam.sizes["full"]).items() if k in cfg["model"] and k != "dropout"}
    assert model == {k: cfg["model"][k] for k in model}
    assert set(model) >= {"family", "task", "d_model", "n_heads", "num_encoder_layers", "num_decoder_layers", "d_ff"}
    assert fam.sizes["full"].vocab == cfg["tokenizer"]["vocab_size"]
    assert fam.tokenizer == cfg["tokenizer"]["model_type"]
    assert script.FAMILIES["gpt"].sizes is script.SIZES  # the default family: its sizes as before


def test_eager_step_engines_are_the_torch_fp32_and_int8_engines_served_with_the_eager_step(script):
    engines = script.served_engines(True, draft_tokens=4, eager_step=True)
    eager = {k for k in engines if k.endswith("-eager")}
    assert eager == {"chatforge-torch-fp32-eager", "chatforge-torch-fp32-draft4-eager", "chatforge-torch-int8-eager",
                     "chatforge-torch-int8-draft4-eager"}  # not bf16 (never scripted) or ct2
    assert all(engines[k] in (("torch", "fp32"), ("torch", "int8")) for k in eager)
    assert script.server_env("chatforge-torch-fp32-draft4-eager", None) == {"CHATFORGE_DECODE_STEP": "eager"}
    assert script.server_env("chatforge-torch-fp32-eager", 2) == {"OMP_NUM_THREADS": "2",
                                                                  "CHATFORGE_DECODE_STEP": "eager"}
    assert script.server_env("chatforge-torch-fp32", None) is None
    assert script.serve_args("chatforge-torch-fp32-draft4-eager") == ["--draft-tokens", "4"]
    rows = script.summarize({"chatforge-torch-fp32": {"1 stream": [_rep(300, 4)]},
                             "chatforge-torch-fp32-eager": {"1 stream": [_rep(200, 6)]},
                             "ct2-direct-float32": {"1 stream": [_rep(600, 2)]}})
    [ratio] = script.step_ratios(rows)
    assert (ratio["engine"], ratio["tokens_per_s"], ratio["ttft"]) == ("chatforge-torch-fp32", 1.5, 1.5)
    result = {"family": "gpt", "created": "now", "machine": {"lscpu_model": "cpu", "cpu": {}, "load_before": [0],
                                                             "load_after": [0]},
              "loaded": False, "config": {"model": "m", "new_tokens": 8, "prompts": "p", "reps": 1},
              "rows": rows, "ratios": script.ratios(rows), "agreement": {}}
    assert "| 1 stream | chatforge-torch-fp32 | 1.50x | 1.50x | 1.50x |" in script.markdown(result)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt", "transformer"])
def test_tiny_run_writes_the_report(script, tmp_path, family):
    pytest.importorskip("ctranslate2")
    result = script.run(tmp_path, script.FAMILIES[family].sizes["tiny"], reps=1, family=family)
    from chatforge.runtime import native_bf16

    engines = {r["engine"] for r in result["rows"]}
    serving = script.served_engines(native_bf16())
    assert engines == {*serving, *script.ANCHORS}
    assert all(r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 for r in result["rows"])
    assert len(result["ratios"]) == len(serving) * len(script.ANCHORS) * len(script.CASES)
    # Same weights: the float32 paths give chatforge torch fp32's greedy tokens, on every reply.
    assert result["agreement"]["chatforge-ct2-float32"] == {"identical_replies": 1.0, "prefix_tokens": 1.0}
    assert result["agreement"]["ct2-direct-float32"] == {"identical_replies": 1.0, "prefix_tokens": 1.0}
    saved = json.loads((tmp_path / "served-generation.json").read_text())
    assert saved["family"] == family
    anchor = {"gpt": "ctranslate2.Generator", "transformer": "ctranslate2.Translator"}[family]
    assert {a["class"] for a in saved["config"]["anchors"].values()} == {anchor}
    assert saved["machine"]["lscpu_model"] and saved["machine"]["load_before"]
    md = (tmp_path / "served-generation.md").read_text()
    assert "| chatforge-ct2-int8 | concurrent |" in md
    assert md.startswith(f"# {script.FAMILIES[family].title} (")
    assert (tmp_path / "served-generation.png").stat().st_size > 0


def test_draft_engines_are_the_torch_engines_served_with_draft_tokens(script):
    engines = script.served_engines(False, draft_tokens=8)
    drafted = {k for k in engines if "-draft" in k}
    assert drafted == {f"{k}-draft8" for k, (backend, _) in script.SERVED.items() if backend == "torch"}
    assert all(engines[k] == engines[k.replace("-draft8", "")] for k in drafted)
    # each engine is served with its own count; the plain ones explicitly without drafts, whatever the default
    assert script.serve_args("chatforge-torch-int8-draft8") == ["--draft-tokens", "8"]
    assert script.serve_args("chatforge-torch-int8-draft8-2t") == ["--draft-tokens", "8"]
    assert script.serve_args("chatforge-torch-int8") == ["--draft-tokens", "0"]
    assert script.served_engines(False) == script.SERVED


@pytest.mark.slow
def test_a_trained_bundle_with_drafts_is_timed_with_and_without_them(script, tmp_path):
    pytest.importorskip("ctranslate2")
    from tests.test_drafts import tiny_generation_config

    from chatforge.training.run import run_experiment

    bundle = run_experiment(tiny_generation_config(), run_dir=tmp_path / "run").bundle_dir
    size = script.FAMILIES["transformer"].sizes["tiny"]._replace(new_tokens=12)
    result = script.run(tmp_path / "out", size, reps=1, family="transformer", bundle=bundle, draft_tokens=4)
    engines = {r["engine"] for r in result["rows"]}
    assert {"chatforge-torch-fp32-draft4", "chatforge-torch-int8-draft4"} <= engines
    assert result["config"]["draft_tokens"] == 4 and result["config"]["model"].startswith("trained bundle bundle")
    # the same weights and greedy tokens with and without drafts
    assert result["agreement"]["chatforge-torch-fp32-draft4"] == {"identical_replies": 1.0, "prefix_tokens": 1.0}
    assert result["agreement"]["ct2-direct-float32"]["identical_replies"] == 1.0
