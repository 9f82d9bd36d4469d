"""Figures README.md quotes from a committed result file agree with that file (at the precision the README prints).

Each check reads the README's own table or sentence and the file it cites, so a rerun that refreshes the file
without the README (or a typo in the README) fails here.
"""

from __future__ import annotations

import json
import re

from tests.deploy_helpers import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
RESULTS = REPO / "benchmarks" / "results"


def _row(first_cell: str) -> list[str]:
    """The cells of the README table row whose first cell is ``first_cell``."""
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"README has no table row {first_cell!r}")


def _num(cell: str) -> float:
    return float(re.search(r"-?[\d,]+(?:\.\d+)?", cell).group(0).replace(",", ""))


def _same(printed: str, value: float) -> bool:
    """``printed`` is ``value`` rounded to the decimals ``printed`` shows."""
    text = re.search(r"-?[\d,]+(?:\.\d+)?", printed).group(0).replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-9


def test_the_load_test_table_is_the_committed_reports():
    for rpc, first in (("reply", "Reply (stream)"), ("classify", "Classify")):
        r = json.loads((REPO / "docs" / "loadtest" / rpc / "report.json").read_text())
        row = _row(first)
        ms = {k: v * 1000 for k, v in r["latency_s"].items()}
        assert _num(row[1]) == r["concurrency"]
        assert _num(row[3]) == r["count"] and _num(row[4]) == r["errors"]
        for cell, value in zip(row[5:10], (r["throughput_rps"], ms["p50"], ms["p90"], ms["p99"], ms["max"]),
                               strict=True):
            assert _same(cell, value), (rpc, cell, value)
        if rpc == "reply":
            ttft = row[10].split("/")
            assert _same(ttft[0], r["ttft_s"]["p50"] * 1000) and _same(ttft[1], r["ttft_s"]["p99"] * 1000)
            total, per_stream = row[11].split(", ")  # "1,618 total, 439 per stream"
            assert _same(total, r["tokens"]["per_second"]), total
            assert _same(per_stream, r["tokens"]["stream_decode_rate_mean"]), (per_stream, r["tokens"])


def test_the_bert_vs_hf_table_is_the_committed_run():
    rows = {(r["task"], r["precision"]): r["ratio"]
            for r in json.loads((RESULTS / "bert_vs_hf.json").read_text())["results"]}
    for task, first in (("mlm_nsp", "pre-training (MLM + NSP)"), ("classification", "sequence classification")):
        row = _row(first)
        assert _same(row[1], rows[(task, "fp32")]) and _same(row[2], rows[(task, "bf16")]), (row, rows)


def test_the_gpt_vs_hf_table_is_the_committed_run():
    # the README's run: 7 repetitions (`--reps 7`), the one committed gpt_vs_hf file with them
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("gpt_vs_hf-*.json"))]
    run = next(r for r in runs if r["args"]["reps"] == "7")
    by = {(r["metric"], r["precision"], r["batch"]): r["ratio"] for r in run["rows"]}
    for first, metric, batch in (("training tokens/s (batch 8 x 128)", "train tokens/s", 8),
                                 ("greedy generation tokens/s, batch 1", "generate tokens/s", 1),
                                 ("greedy generation tokens/s, batch 8", "generate tokens/s", 8),
                                 ("time to first token, batch 1", "TTFT ms", 1)):
        row = _row(first)
        for cell, precision in zip(row[1:3], ("fp32", "bf16"), strict=True):
            assert _same(cell, by[(metric, precision, batch)]), (first, precision, cell)


def test_the_http_attribution_is_the_committed_runs():
    for name, old in (("http_vs_grpc-old-server-raw.json", "old server + `RawSseClient`"),
                      ("http_vs_grpc-httpx.json", "new server +\n  httpx")):
        s = json.loads((RESULTS / name).read_text())["summary"]
        m = re.search(re.escape(old) + r" \+([\d.]+) ms / ([\d.]+)", README)
        assert m, old
        assert _same(m.group(1), s["ttft_overhead_ms"]), (name, m.group(1), s["ttft_overhead_ms"])
        assert _same(m.group(2), s["concurrent_tokens_ratio"]), (name, m.group(2), s["concurrent_tokens_ratio"])


def test_the_chit_chat_reply_quality_rows_are_the_committed_run():
    run = json.loads((RESULTS / "chatbot-replies-ranker-gpt.json").read_text())
    assert run["split"] == "test" and run["hybrid"]["generation"] == "gpt"
    keys = ("chrf", "bleu", "distinct_1", "distinct_2", "avg_length", "repeat_3_rate", "identical_rate")
    for first, model in (("ranker", "ranker"), ("gpt", "gpt"), ("transformer", "transformer"),
                         ("hybrid (ranker, gpt)", "hybrid")):
        row = _row(first)
        for cell, key in zip(row[1:8], keys, strict=True):
            assert _same(cell, run["figures"][model][key]), (first, key, cell)
    # the sentence that says how often retrieval answered, and the threshold it used
    share = run["figures"]["hybrid"]["retrieval_share"] * 100
    assert f"retrieval answered {share:.1f} % of the test questions" in README
    assert f"at least {run['hybrid']['threshold']:.4f}" in README


def test_the_serving_floor_is_the_committed_run():
    r = json.loads((RESULTS / "serving-overhead.json").read_text())
    one, bare = r["one_token_reply"], r["reference_bare_grpc"]["one_token_reply"]
    m = re.search(r"a one-token reply takes ([\d.]+) ms \(([\d.]+) ms of the server's CPU\) and each further token "
                  r"([\d.]+) ms of its CPU", README.replace("\n", " "))
    assert m, "the floor sentence"
    assert _same(m.group(1), one["wall_ms"]) and _same(m.group(2), one["server_cpu_ms"])
    assert _same(m.group(3), r["per_extra_token_us"]["server_cpu_us"] / 1000)
    m = re.search(r"takes ([\d.]+) ms \(([\d.]+) ms of CPU\) and ([\d.]+) ms a token", README.replace("\n", " "))
    assert m and _same(m.group(1), bare["wall_ms"]) and _same(m.group(2), bare["server_cpu_ms"])
    assert _same(m.group(3), r["reference_bare_grpc"]["per_extra_token_us"]["server_cpu_us"] / 1000)
    linger = r["variants"]["chatforge[CHATFORGE_STORE_LINGER_MS=0]"]
    m = re.search(r"took ([\d.]+) ms until the store gathered turns.*?: ([\d.]+)x faster one-token replies "
                  r"and ([\d.]+)x less server CPU", README.replace("\n", " "))
    assert m and _same(m.group(1), linger["one_token_reply"]["wall_ms"])
    assert _same(m.group(2), linger["over_chatforge"]["one_token_reply_wall"])
    assert _same(m.group(3), linger["over_chatforge"]["one_token_reply_server_cpu"])


def test_the_familiarity_guard_table_is_the_committed_run():
    r = json.loads((RESULTS / "familiarity-guard.json").read_text())
    rows = {"ChatbotData test questions (559)": "test",
            "English, the first 500 CLINC150 validation utterances": "english_clinc150",
            "keyboard mash, random Latin letters (300, seeded)": "keyboard_mash",
            "random Hangul syllables (300, seeded)": "random_hangul",
            "word salad: each test question's characters shuffled (559)": "word_salad"}
    for first, key in rows.items():
        row, fig = _row(first), r["sets"][key]
        assert _same(row[1], fig["fallback_share"] * 100), (first, row[1])
        assert _same(row[2], fig["answered_from_pool_without_guard"] * 100), (first, row[2])
        assert _same(row[3], fig["answered_from_pool_with_guard"] * 100), (first, row[3])
    assert r["chosen_on"] == "valid" and r["quantile"] == 0.01
    replies = json.loads((RESULTS / "chatbot-replies-ranker-gpt.json").read_text())
    assert replies["hybrid"]["min_familiarity"] == r["min_familiarity"]  # the same guard, from the same bundle
    text = README.replace("\n", " ")
    assert f"It costs {r['speed']['guard_us']:.0f} us a message against the ranker's " \
           f"{r['speed']['select_us'] / 1000:.0f} ms `select`" in text


def test_the_ranker_select_speedup_is_the_committed_run():
    r = json.loads((RESULTS / "ranker-select.json").read_text())
    text = README.replace("\n", " ")
    assert f"take {r['speedup']:.2f}x less time than before" in text
    assert r["max_abs_feature_difference"] == 0.0 and r["same_top_answer"] == 1.0  # "the same numbers"
    assert f"a whole `select` about {r['select_ms_now']:.0f} ms a message" in text


def test_the_served_ranker_select_ab_is_the_committed_run():
    r = json.loads((RESULTS / "loadtest-ranker-select.json").read_text())
    s = r["summary"]
    text = README.replace("\n", " ")
    assert f"{s['throughput_ratio_median']:.2f}x the replies/s at the median " \
           f"({s['throughput_rps_median']['now']:.1f} against {s['throughput_rps_median']['before']:.1f})" in text
    assert f"half the median latency ({s['p50_ms_median']['now']:.0f} against {s['p50_ms_median']['before']:.0f} ms)" \
        in text
    assert all(run["errors"] == 0 for run in r["runs"]) and len(r["runs"]) == 12
