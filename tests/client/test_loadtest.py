"""Load-test library and CLI against an in-process server with fake models (127.0.0.1)."""

from __future__ import annotations

import csv
import json

import pytest
from tests.serving_fakes import ServerThread, make_engine
from typer.testing import CliRunner

from chatforge.client.loadtest import (
    SLO,
    CallResult,
    LoadReport,
    LoadTestConfig,
    LoadTestError,
    check_slos,
    histogram,
    latency_stats,
    load_texts,
    parse_levels,
    parse_slo,
    percentile,
    run_load_test,
    run_sweep,
    write_report,
    write_sweep,
)
from chatforge.serving.metrics import ServingMetrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server():
    # With ServingMetrics the server counts every call, so the load test's counts can be checked.
    with ServerThread(make_engine(), metrics=ServingMetrics()) as st:
        st.wait_serving()
        yield st


def _cfg(target: str, **kw) -> LoadTestConfig:
    base = dict(rpc="reply", concurrency=2, requests=20, texts=["hello there", "bye now", "how are you"],
                timeout=10.0)
    base.update(kw)
    return LoadTestConfig(target=target, **base)


# ---------------------------------------------------------------------------- statistics
def test_percentiles_nearest_rank_on_hand_checkable_list():
    ms = list(range(100, 0, -1))  # 1..100 ms, unsorted on purpose
    assert percentile(ms, 50) == 50
    assert percentile(ms, 90) == 90
    assert percentile(ms, 99) == 99
    assert percentile(ms, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    # ten values: p95 is the 10th (ceil(9.5)), p50 the 5th
    ten = [0.010, 0.020, 0.030, 0.040, 0.050, 0.060, 0.070, 0.080, 0.090, 1.000]
    stats = latency_stats(ten)
    assert stats["p50"] == 0.050 and stats["p90"] == 0.090 and stats["p95"] == 1.000 and stats["p99"] == 1.000
    assert stats["min"] == 0.010 and stats["max"] == 1.000 and stats["count"] == 10
    assert stats["mean"] == pytest.approx(0.145)
    with pytest.raises(ValueError, match="0..100"):
        percentile(ten, 101)


def test_histogram_bins_cover_all_values():
    h = histogram([1.0, 1.0, 2.0, 3.0, 10.0], buckets=3)
    assert [b["count"] for b in h] == [4, 0, 1]
    assert h[-1]["upper"] == pytest.approx(10.0)
    assert sum(b["fraction"] for b in h) == pytest.approx(1.0)
    assert histogram([5.0, 5.0]) == [{"upper": 5.0, "count": 2, "fraction": 1.0}]


def test_parse_slo_units_and_errors():
    slos = parse_slo("p99=200ms, errors=0.1%, rps=50, p50=1.5s, max=500us, ttft_p99=2m")
    assert [(s.key, s.limit) for s in slos] == [
        ("p99", pytest.approx(0.2)), ("errors", pytest.approx(0.001)), ("rps", 50.0),
        ("p50", 1.5), ("max", pytest.approx(0.0005)), ("ttft_p99", 120.0)]
    assert parse_slo("errors=0.01")[0].limit == 0.01
    for bad, match in [("p99", "KEY=VALUE"), ("p98=1s", "unknown SLO key 'p98'"), ("p99=fast", "duration"),
                       ("errors=150%", "percentage"), ("rps=-1", "requests per second"), ("", "empty")]:
        with pytest.raises(LoadTestError, match=match):
            parse_slo(bad)


def test_check_slos_pass_and_fail_on_a_known_report():
    results = [CallResult(i, 0, i * 0.1, (i + 1) / 1000, "OK") for i in range(99)]
    results.append(CallResult(99, 0, 9.9, 0.001, "UNAVAILABLE", error="down"))
    report = LoadReport("t:1", "classify", 1, 1, None, 10.0, results)
    assert report.count == 100 and report.ok == 99 and report.errors == 1
    assert report.throughput == pytest.approx(10.0)
    assert report.latency()["p99"] == pytest.approx(0.099)  # failures are not in the latency stats
    verdict = {r.slo: r.passed for r in check_slos(report, parse_slo("p99=100ms,errors=1%,rps=10,p50=10ms"))}
    assert verdict == {"p99=100ms": True, "errors=1%": True, "rps=10": True, "p50=10ms": False}
    assert not check_slos(report, [SLO("errors", 0.005, "errors=0.5%")])[0].passed


def test_config_validation_messages():
    with pytest.raises(LoadTestError, match="exactly one of requests"):
        LoadTestConfig("h:1", texts=["x"]).validate()
    with pytest.raises(LoadTestError, match="allowed: reply, classify, health"):
        LoadTestConfig("h:1", rpc="chat", requests=1, texts=["x"]).validate()
    with pytest.raises(LoadTestError, match="concurrency=0"):
        LoadTestConfig("h:1", requests=1, concurrency=0, texts=["x"]).validate()
    with pytest.raises(LoadTestError, match="HOST:PORT"):
        LoadTestConfig("localhost", requests=1, texts=["x"]).validate()
    with pytest.raises(LoadTestError, match="1,2,4,8"):
        parse_levels("1,two")


def test_load_texts_default_corpus_and_custom_file(tmp_path):
    texts = load_texts()
    assert len(texts) > 100 and all(t.strip() for t in texts)
    f = tmp_path / "msgs.jsonl"
    f.write_text('{"text": "first message"}\n{"text": "second one"}\n', encoding="utf-8")
    assert load_texts(f) == ["first message", "second one"]
    with pytest.raises(LoadTestError, match="cannot read"):
        load_texts(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------- end to end
def test_reply_counts_add_up_and_streams_are_measured(server):
    report = run_load_test(_cfg(server.target, requests=25, concurrency=3, connections=2))
    assert report.count == 25
    assert report.ok + report.errors == report.count
    assert report.status_counts() == {"OK": 25}
    assert sorted(r.index for r in report.results) == list(range(25))
    assert {r.channel for r in report.results} == {0, 1}
    # The fake generator streams 4 tokens; TTFT comes before the end of every stream.
    assert all(r.tokens == 4 and r.ttft is not None and 0 < r.ttft <= r.latency for r in report.results)
    data = report.to_dict()
    assert data["tokens"]["total"] == 100 and data["tokens"]["per_second"] > 0
    assert data["ttft_s"]["p99"] is not None and data["latency_s"]["p50"] <= data["latency_s"]["max"]


def test_errors_are_counted_by_status_code(server):
    # "x" * 300 exceeds the fake engine's 200-character limit -> INVALID_ARGUMENT.
    report = run_load_test(_cfg(server.target, rpc="classify", requests=12, texts=["hello", "x" * 300]))
    assert report.status_counts() == {"OK": 6, "INVALID_ARGUMENT": 6}
    assert report.ok + report.errors == 12 and report.error_rate == pytest.approx(0.5)
    assert any("INVALID_ARGUMENT" in k for k in report.error_messages())


def test_duration_bound_stops_by_itself_and_rps_limits_rate(server):
    report = run_load_test(_cfg(server.target, rpc="health", requests=None, duration=0.5, rps=20, concurrency=2))
    # 20 rps for 0.5 s: tickets at 0, 0.05, ..., 0.45 -> exactly 10 (none at or after the deadline)
    assert report.count == 10
    assert report.status_counts() == {"OK": 10}
    starts = sorted(r.start for r in report.results)
    assert starts[-1] >= 0.4  # spread over the window, not sent in one burst


def test_sweep_one_row_per_level_and_files(server, tmp_path):
    sweep = run_sweep(_cfg(server.target, rpc="classify", requests=8), [1, 2, 4])
    rows = sweep.rows()
    assert [r["concurrency"] for r in rows] == [1, 2, 4]
    assert all(r["count"] == 8 and r["ok"] == 8 for r in rows)
    paths = write_sweep(sweep, tmp_path / "sweep")
    assert json.loads(paths["json"].read_text())["levels"] == [1, 2, 4]
    with paths["csv"].open() as f:
        assert [int(r["concurrency"]) for r in csv.DictReader(f)] == [1, 2, 4]
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC


def test_report_files_written(server, tmp_path):
    report = run_load_test(_cfg(server.target, requests=10))
    results = check_slos(report, parse_slo("p99=10s,errors=0%"))
    paths = write_report(report, tmp_path / "out", slos=results)
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["count"] == 10 and data["status_codes"] == {"OK": 10}
    assert [s["passed"] for s in data["slos"]] == [True, True]
    with paths["csv"].open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and rows[0]["status"] == "OK" and float(rows[0]["latency_ms"]) > 0
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_counts_match_server_metrics(server):
    """The load test's counts match what the server's ServingMetrics recorded."""
    metrics = getattr(server.server, "metrics", None)
    if metrics is None or not hasattr(metrics, "value"):
        pytest.skip("ChatbotServer does not expose ServingMetrics (serving/server.py not wired to metrics yet)")

    def total(status: str) -> float:
        return sum(s.value for fam in metrics.registry.collect() for s in fam.samples
                   if s.name == "chatforge_requests_total" and s.labels.get("rpc") == "Classify"
                   and s.labels.get("status") == status)

    before_ok, before_bad = total("OK"), total("INVALID_ARGUMENT")
    report = run_load_test(_cfg(server.target, rpc="classify", requests=10, texts=["hello", "y" * 300]))
    assert total("OK") - before_ok == report.ok == 5
    assert total("INVALID_ARGUMENT") - before_bad == report.errors == 5


# --------------------------------------------------------------------------------- CLI
def _cli(*args: str):
    from chatforge.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_slo_gate_exit_codes(server, tmp_path):
    ok = _cli("loadtest", server.target, "--rpc", "classify", "--requests", "6", "--concurrency", "2",
              "--slo", "p99=30s,errors=0%", "--out", str(tmp_path / "pass"))
    assert ok.exit_code == 0, ok.output
    assert "throughput" in ok.output.lower()
    assert (tmp_path / "pass" / "report.json").is_file()
    missed = _cli("loadtest", server.target, "--rpc", "classify", "--requests", "6", "--slo", "p99=1us")
    assert missed.exit_code == 1, missed.output
    assert "SLO" in missed.output
    bad = _cli("loadtest", server.target, "--requests", "6", "--slo", "p99=soon")
    assert bad.exit_code == 2 and "bad SLO value" in bad.output


def test_cli_sweep(server, tmp_path):
    r = _cli("loadtest", server.target, "--rpc", "health", "--requests", "4", "--sweep", "1,2",
             "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    with (tmp_path / "sweep.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
