"""`chatforge bench`: the smoke run writes its whole report, and bad options fail in one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.cli.bench import BENCH_CASES
from chatforge.runtime import native_bf16

runner = CliRunner()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    # One thread: on a shared 2-core machine two torch threads wait on each other at every barrier.
    r = runner.invoke(app, ["bench", "--smoke", "--threads", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "bench.json").read_text()), r.output


def test_the_cli_knows_every_library_case():
    from chatforge.bench import CASES

    assert BENCH_CASES == tuple(CASES)


def test_smoke_writes_json_markdown_and_a_chart_per_case(smoke):
    out, result, output = smoke
    assert result["smoke"] is True and set(result["cases"]) == set(BENCH_CASES)
    for name in BENCH_CASES:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG"), name
    md = (out / "bench.md").read_text()
    for name in BENCH_CASES:
        assert f"## {name}" in md
    assert "Not measured here" in md and "end-to-end gRPC" in md  # the skipped parts say why
    assert str(out) in output.replace("\n", "")


def test_every_case_has_chatforge_and_anchor_figures_and_ratios(smoke):
    _, result, _ = smoke
    for name, case in result["cases"].items():
        assert case["status"] == "ok", (name, case["reason"])
        roles = {case["engines"][r["engine"]]["role"] for r in case["rows"]}
        assert roles == {"chatforge", "anchor"}, name
        # --smoke: 1 repetition (time to first token, a short call, gets 3 per repetition)
        assert all(r["value"] > 0 and len(r["times_s"]) in (1, 3) for r in case["rows"]), name
        assert case["ratios"] and all(r["ratio"] > 0 for r in case["ratios"]), name
        assert case["peak_rss_mb"] > 0 and len(case["load_before"]) == 3 and isinstance(case["loaded"], bool)
    machine = result["machine"]
    assert machine["threads"] == 1 and machine["cpus_available"] >= 1 and machine["cpu"]["model_name"]
    assert isinstance(result["loaded"], bool)


def test_fp32_greedy_outputs_are_identical_across_chatforge_hf_and_ctranslate2(smoke):
    _, result, _ = smoke
    agreement = result["cases"]["generation"]["agreement"]
    assert agreement["fp32_anchors"] == ["hf-fp32", "ct2-float32"]
    assert agreement["identical_fp32"] is True
    assert agreement["identical_fraction"]["hf-fp32"] == agreement["identical_fraction"]["ct2-float32"] == 1.0


def test_chatforge_precisions_come_from_inference_precisions(smoke):
    from chatforge.inference import PRECISIONS

    _, result, _ = smoke
    plain = {f"chatforge-{p}" for p in PRECISIONS if p != "auto"}  # auto picks one of the others
    # classification times BERT (chatforge-<p>) and the Transformer encoder (chatforge-transformer-<p>)
    for name, wanted in (("generation", plain), ("seq2seq", plain),
                         ("classification", plain | {n.replace("chatforge-", "chatforge-transformer-") for n in plain})):
        engines = result["cases"][name]["engines"]
        assert {n for n, e in engines.items() if e["role"] == "chatforge"} == wanted
        # bf16 is timed only where the CPU computes it natively; elsewhere it is a skipped engine that says why
        timed = wanted if native_bf16() else {n for n in wanted if not n.endswith("-bf16")}
        assert all(engines[n]["status"] == "ok" for n in timed), engines
        assert all("emulated" in engines[n]["reason"] for n in wanted - timed), engines


def test_same_sentencepiece_vocabulary_tokenizes_identically_in_hf_tokenizers(smoke):
    _, result, _ = smoke
    assert result["cases"]["tokenizer"]["agreement"]["identical_fraction"]["hf-tokenizers"] == 1.0


def test_training_reports_the_fraction_of_the_measured_matmul_peak(smoke):
    _, result, _ = smoke
    training = result["cases"]["training"]
    precisions = {"fp32", "bf16"} if native_bf16() else {"fp32"}  # bf16 is not timed where it is emulated
    assert set(training["extra"]["matmul_peak_flops"]) == precisions
    assert set(training["extra"]["fraction_of_peak"]) == {f"{e}-{p}" for e in ("chatforge", "hf", "hf-eager")
                                                          for p in precisions}
    assert all(f > 0 for f in training["extra"]["fraction_of_peak"].values())
    # fp32 is compared with fp32 and bf16 with bf16 only, against HF with its default (SDPA) and eager attention
    assert all(r["chatforge"].rsplit("-", 1)[1] == r["anchor"].rsplit("-", 1)[1] for r in training["ratios"])
    assert {r["anchor"] for r in training["ratios"]} == {f"{e}-{p}" for e in ("hf", "hf-eager") for p in precisions}


@pytest.mark.parametrize(("args", "expected"), [
    (["--cases", "generation,speed"], "--cases speed is unknown; allowed: generation, seq2seq, classification, tokenizer, training, scaling"),
    (["--threads", "0"], "--threads 0 is out of range; allowed: an integer >= 1"),
    (["--repeats", "0"], "--repeats 0 is out of range; allowed: an integer >= 1"),
])
def test_bad_options_fail_in_one_line_naming_the_allowed_values(tmp_path, args, expected):
    r = runner.invoke(app, ["bench", "--smoke", "--out", str(tmp_path / "r"), *args])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], r.output
    assert not (tmp_path / "r").exists()


def test_threads_default_to_the_cpu_quota_not_the_affinity_mask(tmp_path, monkeypatch):
    """A 1-CPU container on a 2-CPU host (podman --cpus 1: affinity 2, cgroup quota 1.0) runs with 1 thread.
    The affinity mask alone gave it 2 (seen in such a container: bench.json threads 2, available_cpus 1)."""
    from chatforge import runtime

    monkeypatch.setattr(runtime, "_affinity", lambda: 2)
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda *a, **k: 1.0)
    r = runner.invoke(app, ["bench", "--smoke", "--cases", "tokenizer", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "r" / "bench.json").read_text())
    assert doc["machine"]["threads"] == 1 and doc["machine"]["cpus_available"] == 1
    assert doc["machine"]["cpu"]["cgroup_cpu_quota"] == 1.0
