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
