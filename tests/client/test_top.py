"""Resource monitor (chatforge top) against an in-process MetricsHTTPServer on 127.0.0.1."""

from __future__ import annotations

import os
import re

import psutil
import pytest
from typer.testing import CliRunner

from chatforge.client.top import (
    MonitorError,
    ResourceMonitor,
    metrics_url,
    parse_metrics,
    summarize_samples,
)
from chatforge.inference import ModelInfo
from chatforge.serving.metrics import MetricsHTTPServer, ServingMetrics


@pytest.fixture()
def metrics_server():
    m = ServingMetrics()
    m.set_model_info(ModelInfo("chat", "fake", "generation"))
    with MetricsHTTPServer(m) as srv:
        yield m, srv


def test_metrics_url_forms():
    assert metrics_url("127.0.0.1:9100") == "http://127.0.0.1:9100/metrics"
    assert metrics_url("http://h:1") == "http://h:1/metrics"
    assert metrics_url("http://h:1/custom") == "http://h:1/custom"


def test_samples_show_process_resources_and_queue(metrics_server):
    m, srv = metrics_server
    mon = ResourceMonitor(f"127.0.0.1:{srv.port}", interval=0.05)
    first = mon.sample()
    # This process is the "server": its RSS, fds and threads are what the endpoint reports.
    me = psutil.Process(os.getpid())
    assert first.rss_bytes == pytest.approx(me.memory_info().rss, rel=0.5)
    assert first.open_fds >= 3 and first.threads >= 2  # the HTTP server thread at least
    assert first.cpu_seconds > 0 and first.cpu_percent is None  # a rate needs two samples
    assert first.gpu_allocated_bytes is None  # no CUDA here: absent, not zero
    m.request_queued("chat")
    m.request_queued("chat")
    m.request_dequeued("chat", 0.01)
    m.request_started("Reply", "chat")
    for status in ("OK", "OK", "INVALID_ARGUMENT"):
        m.request_started("Reply", "chat")
        m.first_token("Reply", "chat", 0.01)
        m.request_finished("Reply", "chat", status, 0.1)
    second = mon.sample()
    assert (second.requests_waiting, second.requests_running) == (1, 1)
    assert second.requests_total - first.requests_total == 3
    assert second.errors_total - first.errors_total == 1
    assert second.cpu_percent is not None and second.cpu_percent >= 0
    assert second.requests_per_s > 0 and second.tokens_per_s > 0
    summary = summarize_samples(first, [second])
    assert summary["requests_delta"] == 3 and summary["errors_delta"] == 1
    assert summary["requests_waiting_max"] == 1 and summary["rss_bytes_max"] > 0


def test_watch_yields_count_samples(metrics_server):
    _, srv = metrics_server
    samples = list(ResourceMonitor(srv.url, interval=0.01).watch(3))
    assert len(samples) == 3 and samples[0].time < samples[2].time


def test_gpu_memory_summed_over_devices():
    text = (
        "# TYPE chatforge_gpu_memory_allocated_bytes gauge\n"
        'chatforge_gpu_memory_allocated_bytes{device="0"} 100.0\n'
        'chatforge_gpu_memory_allocated_bytes{device="1"} 50.0\n'
        "# TYPE chatforge_requests_waiting gauge\n"
        'chatforge_requests_waiting{model="a"} 2.0\n'
        'chatforge_requests_waiting{model="b"} 3.0\n'
    )
    fields = parse_metrics(text)
    assert fields["gpu_allocated_bytes"] == 150 and fields["requests_waiting"] == 5
    assert fields["rss_bytes"] is None


def test_unreachable_endpoint_names_the_url():
    with pytest.raises(MonitorError, match="127.0.0.1:9/metrics"):
        ResourceMonitor("127.0.0.1:9", timeout=1).sample()
    with pytest.raises(ValueError, match="interval"):
        ResourceMonitor("127.0.0.1:9", interval=0)


def test_cli_top_renders_count_samples(metrics_server):
    from chatforge.cli import app

    _, srv = metrics_server
    r = CliRunner().invoke(app, ["top", f"127.0.0.1:{srv.port}", "--interval", "0.01", "--count", "2"],
                           env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    assert "chatforge top" in r.output
    assert len(re.findall(r"\d\d:\d\d:\d\d", r.output)) == 2  # one row per sample
    bad = CliRunner().invoke(app, ["top", "127.0.0.1:9", "--count", "1"])
    assert bad.exit_code == 1 and "cannot read metrics" in bad.output
