"""benchmarks/tokenizer_batch.py at tiny sizes: both ways give the same ids and the ratio is theirs."""

from __future__ import annotations

import pytest
from tests.benchmarks.conftest import load

from chatforge.tokenizer import Tokenizer


def test_measure_reports_both_ways_and_their_ratio():
    script = load("tokenizer_batch")
    texts = ["안녕하세요 반갑습니다", "오늘 날씨가 정말 좋네요", "hello there", "what should we eat"] * 10
    tok = Tokenizer.train(texts, vocab_size=60, character_coverage=1.0, on_vocab_too_large="lower")
    rows = script.measure(tok.sp, texts, [1, 5], rounds=2)
    assert [r["texts"] for r in rows] == [1, 5]
    for r in rows:
        us = r["us_per_call"]
        assert us["list form"] > 0 and us["one call per text"] > 0
        assert r["ratio_per_text_over_list"] == pytest.approx(us["list form"] / us["one call per text"], rel=0.02)
