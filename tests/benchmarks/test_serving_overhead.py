"""benchmarks/serving_overhead.py at tiny sizes: a real server process with the zero-cost model streams exactly the
tokens asked for, the per-token figures are the difference of the two reply lengths, the bare grpc.aio reference is
measured in the same rounds, and the record names the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from tests.benchmarks.conftest import load


def test_the_zero_step_model_follows_the_batchers_protocol():
    step = load("serving_overhead")._ZeroStep()
    state, logits = step.prefill([[5], [5, 5]], bos_id=1)
    assert state == {"n": 2} and logits.argmax(-1).tolist() == [4, 4]
    assert step.step(state, torch.tensor([4, 63])).argmax(-1).tolist() == [5, 4]  # never 0-3: no </s>, no pad
    assert step.select(step.merge(state, state), torch.tensor([0, 3])) == {"n": 2}


def test_main_writes_per_reply_and_per_token_figures(tmp_path, capsys):
    script = load("serving_overhead")
    out = tmp_path / "so.json"
    script.main(["--tokens", "4", "--replies", "3", "--rounds", "2", "--step-ms", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["settings"] == {"tokens": 4, "replies": 3, "rounds": 2, "step_ms": 2.0}
    one, four = r["one_token_reply"], r["4_token_reply"]
    for figures in (one, four):
        # CPU times tick every 10 ms: three short replies may read 0
        assert figures["wall_ms"] > 0 and figures["server_cpu_ms"] >= 0 and figures["ttft_ms"] <= figures["wall_ms"]
    assert four["wall_ms"] >= 4 * 2.0  # a prefill and three steps of 2 ms each, at least
    assert r["per_extra_token_us"]["wall_us"] == pytest.approx((four["wall_ms"] - one["wall_ms"]) / 3 * 1e3)
    assert r["one_stream_tokens_per_s_ceiling"] == pytest.approx(4 / (four["wall_ms"] / 1e3))
    assert len(r["rounds"]["1"]) == len(r["rounds"]["4"]) == 2
    assert r["machine"]["cpu"]["model_name"]
    # the bare grpc.aio reference ran in the same rounds, streamed the same lengths, and the ratios are of the two
    bare = r["reference_bare_grpc"]
    assert len(bare["rounds"]["1"]) == len(bare["rounds"]["4"]) == 2
    assert bare["4_token_reply"]["wall_ms"] >= 4 * 2.0
    assert r["chatforge_over_bare"]["one_token_reply_wall"] == pytest.approx(
        one["wall_ms"] / bare["one_token_reply"]["wall_ms"])
    printed = capsys.readouterr().out
    assert "per extra token" in printed and "chatforge / bare" in printed


def test_the_bare_reference_streams_exactly_the_tokens_asked_for(tmp_path):
    from chatforge.client import ChatbotClient

    script = load("serving_overhead")
    proc = script._start("bare", tmp_path / "bare.port", 0.0)
    try:
        with ChatbotClient(f"127.0.0.1:{(tmp_path / 'bare.port').read_text().strip()}", timeout=30) as client:
            chunks = list(client.reply_stream("w 1", max_new_tokens=5))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    tokens = [c.token_id for c in chunks if not c.is_final]
    assert tokens == [4, 5, 6, 7, 8] and chunks[-1].is_final and chunks[-1].completion_tokens == 5


def test_a_variant_is_a_third_server_in_the_same_rounds(tmp_path, capsys):
    out = tmp_path / "so.json"
    load("serving_overhead").main(["--tokens", "3", "--replies", "2", "--rounds", "2", "--step-ms", "1",
                                   "--variant", "CHATFORGE_STORE_LINGER_MS=0", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["settings"]["variants"] == {"CHATFORGE_STORE_LINGER_MS": "0"}
    v = r["variants"]["chatforge[CHATFORGE_STORE_LINGER_MS=0]"]
    assert len(v["rounds"]["1"]) == 2 and v["3_token_reply"]["wall_ms"] >= 3 * 1.0
    assert v["over_chatforge"]["one_token_reply_wall"] == pytest.approx(
        v["one_token_reply"]["wall_ms"] / r["one_token_reply"]["wall_ms"])
    assert "chatforge[CHATFORGE_STORE_LINGER_MS=0]" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--tokens", "1"], ["--step-ms", "-1"], ["--variant", "LINGER"],
                                 ["--variant", "HOME=/tmp"]])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(SystemExit):
        load("serving_overhead").main(bad)
