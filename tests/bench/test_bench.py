"""chatforge.bench: missing anchors skip (with the reason), a loaded machine is flagged, machine info."""

from __future__ import annotations

import json
import sys

import pytest

from chatforge.bench import LOADED_NOTE, BenchError, BenchOptions, cases, machine, run_bench


def test_missing_anchors_are_reported_skipped_with_the_reason_not_a_crash(tmp_path, monkeypatch):
    # None in sys.modules makes `import onnxruntime` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    result, paths = run_bench(BenchOptions(out=tmp_path, cases=["classification", "generation", "seq2seq"],
                                           threads=1, repeats=1, smoke=True))
    cls = result["cases"]["classification"]
    assert cls["status"] == "skipped" and "onnxruntime is not installed" in cls["reason"]
    assert "chatforge[bench]" in cls["reason"]
    gen = result["cases"]["generation"]
    assert gen["status"] == "ok"  # HF transformers is still there
    for q in ("float32", "int8"):
        assert gen["engines"][f"ct2-{q}"]["status"] == "skipped"
        assert "ctranslate2 is not installed" in gen["engines"][f"ct2-{q}"]["reason"]
    assert {r["anchor"] for r in gen["ratios"]} == {"hf-fp32"}
    assert gen["agreement"]["fp32_anchors"] == ["hf-fp32"] and gen["agreement"]["identical_fp32"] is True
    s2s = result["cases"]["seq2seq"]
    assert s2s["status"] == "ok" and s2s["engines"]["ct2-float32"]["status"] == "skipped"
    assert {r["anchor"] for r in s2s["ratios"]} == {"hf-fp32"}
    md = paths["markdown"].read_text()
    assert "skipped: onnxruntime is not installed" in md and "Engine ct2-int8 skipped" in md
    assert "classification" not in paths  # no chart for a skipped case


def test_a_run_on_a_loaded_machine_says_its_figures_are_ratios_only(tmp_path, monkeypatch):
    import chatforge.bench as bench

    cpus = machine.cpus_available()
    monkeypatch.setattr(bench, "load_average", lambda: [cpus + 1.5, 1.0, 1.0])
    result, paths = run_bench(BenchOptions(out=tmp_path, cases=["tokenizer"], threads=1, repeats=1, smoke=True))
    assert result["loaded"] is True and result["note"] == LOADED_NOTE
    assert result["cases"]["tokenizer"]["loaded"] is True
    assert json.loads(paths["json"].read_text())["note"] == LOADED_NOTE
    assert f"**{LOADED_NOTE}**" in paths["markdown"].read_text()


def test_a_quiet_machine_is_not_flagged():
    assert machine.is_loaded([[0.5, 0.4, 0.3], [1.9, 1.0, 1.0]], cpus=2) is False
    assert machine.is_loaded([[0.5, 0.4, 0.3], [2.1, 1.0, 1.0]], cpus=2) is True


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cases": ["generation", "gpu"]}, "unknown case 'gpu'; allowed: generation, seq2seq, classification, tokenizer, training, "
                                    "scaling"),
    ({"threads": 0}, "threads=0 is out of range"),
    ({"repeats": 0}, "repeats=0 is out of range"),
])
def test_bad_options_are_refused_before_anything_runs(tmp_path, kwargs, message):
    with pytest.raises(BenchError, match=message):
        run_bench(BenchOptions(out=tmp_path / "r", smoke=True, **kwargs))
    assert not (tmp_path / "r").exists()


def test_machine_facts_are_the_runtimes_quota_included(monkeypatch):
    """The bench describes and sizes CPUs as the server does (chatforge.runtime): a 1-CPU quota on a 2-CPU
    affinity mask is 1 CPU available, in the report and for the default thread count."""
    from chatforge import runtime

    monkeypatch.setattr(runtime, "_affinity", lambda: 2)
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda *a, **k: 1.0)
    info = machine.cpu_info()
    assert {"model_name", "flags", "available_cpus", "load_average", "cgroup_cpu_quota"} <= set(info)
    assert {"amx_bf16", "avx512_bf16", "avx512_vnni"} <= set(info["flags"])
    assert info["affinity_cpus"] == 2 and info["cgroup_cpu_quota"] == 1.0
    assert info["available_cpus"] == machine.cpus_available() == 1
    json.dumps(info)  # JSON-able


def test_a_precision_the_model_refuses_is_a_skipped_engine_and_auto_is_not_benchmarked(tmp_path, monkeypatch):
    from chatforge import inference

    real = inference.load_model

    def refusing(bundle, name, version="1", precision="fp32"):
        if precision == "int8":
            raise ValueError("precision int8 does not apply to family 'bert'")
        return real(bundle, name, version, precision=precision)

    monkeypatch.setattr(inference, "PRECISIONS", ("fp32", "bf16", "int8", "auto"))
    monkeypatch.setattr(inference, "load_model", refusing)
    monkeypatch.setattr(cases, "native_bf16", lambda: True)  # whatever this machine's CPU is
    result, _ = run_bench(BenchOptions(out=tmp_path, cases=["classification"], threads=1, repeats=1, smoke=True))
    case = result["cases"]["classification"]
    assert case["status"] == "ok"
    assert {n for n, e in case["engines"].items() if e["role"] == "chatforge"} == {
        "chatforge-fp32", "chatforge-bf16", "chatforge-int8",
        "chatforge-transformer-fp32", "chatforge-transformer-bf16", "chatforge-transformer-int8"}
    assert case["engines"]["chatforge-int8"]["status"] == "skipped"
    assert "does not apply to family 'bert'" in case["engines"]["chatforge-int8"]["reason"]
    assert case["engines"]["chatforge-transformer-int8"]["status"] == "skipped"
    assert {r["engine"] for r in case["rows"]} == {
        "chatforge-fp32", "chatforge-bf16", "ort-fp32", "ort-int8",
        "chatforge-transformer-fp32", "chatforge-transformer-bf16", "ort-transformer-fp32", "ort-transformer-int8"}


def test_the_contended_case_runs_busy_processes_beside_the_run_and_stops_them(tmp_path, monkeypatch):
    import chatforge.bench as bench

    started = []
    real = bench.start_hogs

    def spy(n):
        procs = real(n)
        started.extend(procs)
        assert all(p.poll() is None for p in procs)  # running while the cases run
        return procs

    monkeypatch.setattr(bench, "start_hogs", spy)
    result, paths = run_bench(BenchOptions(out=tmp_path, cases=["tokenizer"], threads=1, repeats=1, smoke=True,
                                           contend=2))
    assert len(started) == 2 and all(p.poll() is not None for p in started)  # stopped when the run ends
    assert result["machine"]["contended_by"] == 2 and "2 busy-looping" in result["contended_note"]
    assert result["contended_note"] in paths["markdown"].read_text()
    with pytest.raises(BenchError, match="contend=65 is out of range; allowed: 0 to 64"):
        run_bench(BenchOptions(out=tmp_path / "r", smoke=True, contend=65))


def test_bf16_engines_are_skipped_where_the_cpu_only_emulates_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(cases, "native_bf16", lambda: False)  # an AMD EPYC with AVX2 only, say
    result, _ = run_bench(BenchOptions(out=tmp_path, cases=["classification", "training"], threads=1, repeats=1,
                                       smoke=True))
    for name, engines in (("classification", ["chatforge-bf16"]),
                          ("training", ["chatforge-bf16", "hf-bf16", "hf-eager-bf16"])):
        case = result["cases"][name]
        assert case["status"] == "ok"
        for e in engines:
            assert case["engines"][e]["status"] == "skipped" and "emulated" in case["engines"][e]["reason"]
        assert not any(r["engine"].endswith("bf16") for r in case["rows"])
        assert any(r["engine"] == "chatforge-fp32" for r in case["rows"])
    assert set(result["cases"]["training"]["extra"]["matmul_peak_flops"]) == {"fp32"}
    # Training is compared with HF's default attention (SDPA) and with its eager attention, each in the same precision.
    assert {(r["chatforge"], r["anchor"]) for r in result["cases"]["training"]["ratios"]} == {
        ("chatforge-fp32", "hf-fp32"), ("chatforge-fp32", "hf-eager-fp32")}
