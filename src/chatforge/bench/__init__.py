"""``chatforge bench``: chatforge against established inference libraries on identical weights and inputs.

Cases (:data:`CASES`): greedy generation (GPT-2; anchors HF transformers and CTranslate2 float32/int8),
seq2seq generation (the Transformer encoder-decoder; anchors HF ``MarianMTModel`` and CTranslate2 float32/int8),
classification (BERT and the Transformer encoder; anchors ONNX Runtime fp32 and dynamic int8), tokenizer throughput (SentencePiece
vs Hugging Face tokenizers) and training (chatforge vs HF in fp32 and bf16, with achieved FLOP/s as
a fraction of a measured matmul peak). Each records the peak RSS and the load before and after; a
run whose load exceeded the CPUs available is flagged loaded (figures are ratios only).

The library logs and reports progress through a callback; the CLI renders it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from chatforge.bench.cases import CASES, FULL, LEFT_OUT, SMOKE, Assets, run_case
from chatforge.bench.machine import (
    cpu_info,
    cpus_available,
    is_loaded,
    load_average,
    peak_rss_mb,
    reset_peak_rss,
)
from chatforge.bench.report import LOADED_NOTE, write_report
from chatforge.bench.served import stop_servers

__all__ = ["CASES", "LOADED_NOTE", "BenchError", "BenchOptions", "run_bench"]

logger = logging.getLogger(__name__)

ANCHOR_PACKAGES = ("transformers", "tokenizers", "ctranslate2", "onnxruntime", "onnx")


# --contend: how many busy-looping processes at most (a shared machine's load is what it stands for).
MAX_CONTEND = 64
HOG = "while True: pass"


def start_hogs(n: int) -> list[subprocess.Popen]:
    """``n`` busy-looping Python processes: the CPU hog of the contended case."""
    return [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]


class BenchError(ValueError):
    """A bad option: the message names what was wrong and what is allowed."""


@dataclass
class BenchOptions:
    out: Path
    cases: Sequence[str] = tuple(CASES)
    threads: int = 2
    repeats: int = 3
    smoke: bool = False
    contend: int = 0  # busy-looping processes run beside the whole run: the contended case (issue 16)

    def validate(self) -> BenchOptions:
        unknown = [c for c in self.cases if c not in CASES]
        if unknown or not self.cases:
            raise BenchError(f"unknown case {', '.join(map(repr, unknown)) or '(none given)'}; allowed: "
                             f"{', '.join(CASES)}")
        if self.threads < 1:
            raise BenchError(f"threads={self.threads} is out of range; allowed: 1 to {cpus_available()} "
                             "(the CPUs available)")
        if self.repeats < 1:
            raise BenchError(f"repeats={self.repeats} is out of range; allowed: an integer >= 1")
        if not 0 <= self.contend <= MAX_CONTEND:
            raise BenchError(f"contend={self.contend} is out of range; allowed: 0 to {MAX_CONTEND} busy processes")
        return self


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "chatforge", *ANCHOR_PACKAGES):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_bench(opts: BenchOptions, progress: Callable[[str], None] | None = None,
              on_case_done: Callable[[str, dict], None] | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the selected cases in this process and write the report under ``opts.out``.

    Returns the result (what bench.json holds) and the written paths. Each case's repetitions are
    interleaved across its engines; warm-up calls are not timed. Torch's thread count is restored after.
    """
    opts.validate()
    import torch

    step = progress or (lambda msg: logger.info("%s", msg))
    sizes = SMOKE if opts.smoke else FULL
    cpus = cpus_available()
    # The anchors' own pools: tokenizers (rayon) reads its size at first use. CTranslate2's Intel OpenMP
    # spins 200 ms after each parallel region by default (KMP_BLOCKTIME): with engines interleaved in
    # one process that spinning would take the cores from the engine timed next, so it sleeps at once.
    os.environ.setdefault("RAYON_NUM_THREADS", str(opts.threads))
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    load_before = load_average()
    result: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "smoke": opts.smoke, "options": {"cases": list(opts.cases), "threads": opts.threads,
                                         "repeats": opts.repeats, "sizes": sizes.__dict__},
        "machine": {"cpu": cpu_info(), "cpus_available": cpus, "threads": opts.threads, "load_before": load_before,
                    "versions": _versions(),
                    "env": {k: os.environ.get(k) for k in ("RAYON_NUM_THREADS", "KMP_BLOCKTIME", "OMP_NUM_THREADS",
                                                             "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}},
        "cases": {}, "left_out": dict(LEFT_OUT)}
    result["machine"]["contended_by"] = opts.contend
    hogs = start_hogs(opts.contend)
    try:
        with tempfile.TemporaryDirectory(prefix="chatforge-bench-") as work:
            assets = Assets(Path(work), sizes)
            for name in opts.cases:
                before, t0 = load_average(), time.perf_counter()
                reset_peak_rss()
                case = run_case(name, assets, opts.threads, opts.repeats, step).to_json()
                after = load_average()
                case.update(peak_rss_mb=peak_rss_mb(), load_before=before, load_after=after,
                            loaded=is_loaded([before, after], cpus), seconds=round(time.perf_counter() - t0, 2))
                result["cases"][name] = case
                logger.info("bench case %s: %s in %.1f s", name, case["status"], case["seconds"])
                if on_case_done:
                    on_case_done(name, case)
    finally:
        stop_servers(hogs, timeout=10)
        torch.set_num_threads(old_threads)
    result["machine"]["load_after"] = load_average()
    result["loaded"] = is_loaded([load_before, result["machine"]["load_after"]], cpus) or any(
        c.get("loaded") for c in result["cases"].values())
    if result["loaded"]:
        result["note"] = LOADED_NOTE
    if opts.contend:
        result["contended_note"] = (f"Contended on purpose: {opts.contend} busy-looping process(es) ran beside the "
                                    "whole run (--contend), the case of a shared machine; compare with a quiet run.")
    return result, write_report(result, opts.out)
