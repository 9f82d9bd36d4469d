"""benchmarks/log_line.py at tiny sizes: both ways write the same line and the ratio is theirs."""

from __future__ import annotations

import pytest
from tests.benchmarks.conftest import load

from chatforge.serving import observability


def test_measure_times_both_ways_on_the_same_line_and_restores_the_shipped_mask():
    script = load("log_line")
    shipped = observability.mask_secrets
    r = script.measure(lines=20, rounds=2)
    assert observability.mask_secrets is shipped
    assert r["same_line"] is True
    us = r["us_per_line"]
    assert us["pre-check"] > 0 and us["always"] > 0
    assert r["ratio_always_over_pre_check"] == pytest.approx(us["always"] / us["pre-check"], rel=0.01)
