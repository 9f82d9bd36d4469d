"""chatforge.bench.timing: interleaved rounds after an untimed warm-up."""

from __future__ import annotations

from chatforge.bench.timing import interleaved, matmul_peak_flops


def test_engines_are_timed_in_interleaved_rounds_after_a_warm_up():
    calls: list[str] = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
                         "c": lambda: calls.append("c")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "c"] * 4  # one warm-up round, then three timed rounds A, B, C
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_matmul_peak_is_a_positive_flop_rate_per_precision():
    assert matmul_peak_flops(32, "fp32", reps=1) > 0
    assert matmul_peak_flops(32, "bf16", reps=1) > 0
