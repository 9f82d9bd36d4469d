"""Benchmark scripts write under runs/bench/ by default; only --publish (or an explicit --out) touches the committed
benchmarks/results/.

Found by a review: thirteen scripts defaulted their --out into benchmarks/results/, so a plain run dirtied the tree and
replaced the published figures (the README's) with that day's machine. Each script is run here only up to the point
where it resolves its output path (no benchmark runs)."""

from __future__ import annotations

import re
import sys

import pytest
from tests.benchmarks.conftest import ROOT, load

RUNS = ROOT / "runs" / "bench"
PUBLISHED = ROOT / "benchmarks" / "results"

# script -> (arguments it needs to parse, the file it writes)
SCRIPTS = {
    "bert_vs_hf": ([], "bert_vs_hf.json"),
    "clinc_xgboost": ([], "clinc_xgboost.json"),
    "compiled_step": ([], "compiled-step.json"),
    "familiarity_guard": (["--bundle", "b"], "familiarity-guard.json"),
    "ranker_select": (["--bundle", "b"], "ranker-select.json"),
    "gpt_vs_hf": ([], ""),  # a folder: gpt_vs_hf-<time>.json inside
    "int8_quality": ([], "int8-quality.json"),
    "int8_sizes": ([], "int8-sizes.json"),
    "omp_wait_policy": ([], "omp-wait-policy.json"),
    "ort_quality": ([], "ort-quality.json"),
    "precision_speed": (["--generator", "g", "--classifier", "c"], "precision-speed.json"),
    "grpc_path": (["--workdir", "w", "--precision", "bf16"], "grpc-path-base-bf16.json"),
    "http_path": (["--workdir", "w"], "http-path-tiny.json"),
    "http_vs_grpc": (["--size", "base"], "http_vs_grpc-base.json"),
    "serving_bench": (["--size", "tiny", "--torch-threads", "2"], "serving-tiny-t2.json"),
}


class _Resolved(Exception):
    pass


def _resolved_output(name: str, argv: list[str], monkeypatch):
    """The path ``benchmarks/<name>.py ARGV`` would write to: its main() runs until it resolves it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    mod = load(name)
    real = mod.output_path

    def stop(args, file_name):
        raise _Resolved(real(args, file_name))

    monkeypatch.setattr(mod, "output_path", stop)
    with pytest.raises(_Resolved) as caught:
        mod.main()
    return caught.value.args[0]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_default_output_is_untracked_and_publish_is_explicit(name, monkeypatch):
    argv, file_name = SCRIPTS[name]
    assert _resolved_output(name, argv, monkeypatch) == RUNS / file_name
    monkeypatch.undo()
    assert _resolved_output(name, [*argv, "--publish"], monkeypatch) == PUBLISHED / file_name
    monkeypatch.undo()
    assert _resolved_output(name, [*argv, "--out", "/tmp/x.json"], monkeypatch).as_posix() == "/tmp/x.json"


def test_out_and_publish_together_are_refused(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["omp_wait_policy.py", "--publish", "--out", "x.json"])
    with pytest.raises(SystemExit) as e:
        load("omp_wait_policy").main()
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_no_script_builds_a_default_path_into_the_published_results():
    pattern = re.compile(r'(?:ROOT\s*/\s*"benchmarks"|HERE)\s*/\s*"results"')
    offenders = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py")) if pattern.search(p.read_text())]
    assert not offenders, f"write under runs/bench by default (benchmarks/_output.py): {offenders}"
