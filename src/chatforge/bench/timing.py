"""Timing helpers shared by ``chatforge bench`` and the scripts in benchmarks/.

Engines of one case are timed in interleaved rounds (A, B, C, A, B, C, ...) after one warm-up call
each, so a neighbour that loads the machine for a while slows every engine alike and the ratios
stay meaningful even when the absolute figures do not.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

logger = logging.getLogger(__name__)


def autocast(precision: str):
    """bf16 autocast on CPU for ``precision == "bf16"``, else nothing (fp32)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times per engine: ``warmup`` untimed calls each, then ``repeats`` rounds calling every engine
    once per round in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_peak_flops(n: int, precision: str, reps: int = 3) -> float:
    """Measured FLOP/s of one (n, n) @ (n, n) matmul in ``precision`` (fp32 or bf16): the best of ``reps`` timed
    calls after a warm-up, of torch.matmul and, where this torch build has it, of oneDNN's linear op (in fp32
    torch's CPU matmul is oneMKL's sgemm, which ran at half oneDNN's speed on the AMD EPYC measured), the ceiling
    achieved training FLOP/s are compared with."""
    from chatforge.modules.linear import _onednn_linear

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    calls = [lambda: torch.matmul(a, b)]
    op = _onednn_linear()
    if op is not None:
        calls.append(lambda: op(a, b, None, "none", [], ""))
    best = float("inf")
    for call in calls:
        call()
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
