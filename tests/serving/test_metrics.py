"""ServingMetrics hooks and the /metrics, /healthz, /readyz HTTP mirror."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from chatforge.inference import ModelInfo
from chatforge.serving.metrics import FAILURE_REASONS, MetricsHTTPServer, ServingMetrics


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_request_lifecycle_hooks():
    m = ServingMetrics(process_metrics=False)
    m.request_queued("gpt")
    assert m.value("chatforge_requests_waiting", {"model": "gpt"}) == 1
    m.request_dequeued("gpt", 0.02)
    m.request_started("Chat", "gpt")
    assert m.value("chatforge_requests_waiting", {"model": "gpt"}) == 0
    assert m.value("chatforge_requests_running", {"model": "gpt"}) == 1
    m.prompt_tokens("gpt", 7)
    m.batch("gpt", 3)
    m.first_token("Chat", "gpt", 0.05)
    m.token("gpt", 0.004)
    m.token("gpt", 0.006)
    m.request_finished("Chat", "gpt", "OK", 0.3)
    v = m.value
    assert v("chatforge_requests_running", {"model": "gpt"}) == 0
    assert v("chatforge_requests_total", {"rpc": "Chat", "model": "gpt", "status": "OK"}) == 1
    assert v("chatforge_time_to_first_token_seconds_count", {"rpc": "Chat", "model": "gpt"}) == 1
    assert v("chatforge_time_to_first_token_seconds_sum", {"rpc": "Chat", "model": "gpt"}) == pytest.approx(0.05)
    assert v("chatforge_inter_token_latency_seconds_count", {"model": "gpt"}) == 2
    assert v("chatforge_request_duration_seconds_sum", {"rpc": "Chat", "model": "gpt"}) == pytest.approx(0.3)
    assert v("chatforge_queue_time_seconds_count", {"model": "gpt"}) == 1
    assert v("chatforge_batch_size_sum", {"model": "gpt"}) == 3
    assert v("chatforge_prompt_tokens_total", {"model": "gpt"}) == 7
    assert v("chatforge_generation_tokens_total", {"model": "gpt"}) == 3  # first token + 2


@pytest.mark.parametrize("reason", FAILURE_REASONS)
def test_failure_reasons_counted(reason):
    m = ServingMetrics(process_metrics=False)
    m.request_started("Classify", "bert")
    m.request_finished("Classify", "bert", "ERR", 0.1, reason=reason)
    assert m.value("chatforge_request_failure_total", {"rpc": "Classify", "model": "bert", "reason": reason}) == 1


def test_unknown_failure_reason_is_rejected():
    m = ServingMetrics(process_metrics=False)
    with pytest.raises(ValueError, match="allowed: validation, overloaded, cancelled, deadline, short_deadline, internal"):
        m.request_finished("Chat", "gpt", "ERR", 0.1, reason="oops")


def test_instances_have_separate_registries():
    a, b = ServingMetrics(), ServingMetrics()  # would raise "Duplicated timeseries" on a shared registry
    a.request_started("Chat", "m")
    a.request_finished("Chat", "m", "OK", 0.1)
    assert a.value("chatforge_requests_total", {"rpc": "Chat", "model": "m", "status": "OK"}) == 1
    assert b.value("chatforge_requests_total", {"rpc": "Chat", "model": "m", "status": "OK"}) is None


def test_model_info_and_process_metrics():
    m = ServingMetrics()
    info = ModelInfo(name="gpt-tiny", family="gpt", task="generation", version="3")
    m.set_model_info(info)
    labels = {"model": "gpt-tiny", "family": "gpt", "task": "generation", "version": "3"}
    assert m.value("chatforge_model_info", labels) == 1
    m.remove_model_info(info)
    assert m.value("chatforge_model_info", labels) is None
    assert m.value("chatforge_process_resident_memory_bytes") > 0
    assert m.value("chatforge_process_threads") >= 1
    assert m.value("chatforge_process_cpu_seconds_total") >= 0
    text = m.render().decode()
    assert "chatforge_process_open_fds" in text
    # GPU gauges only where CUDA is usable (torch may not even be imported here).
    import torch

    assert ("chatforge_gpu_memory_allocated_bytes" in text) == torch.cuda.is_available()


def test_http_mirror_endpoints():
    m = ServingMetrics()
    m.request_started("Chat", "gpt")
    m.request_finished("Chat", "gpt", "OK", 0.2)
    ready = {"value": False}
    with MetricsHTTPServer(m, "127.0.0.1", 0, readiness=lambda: ready["value"]) as server:
        assert server.port > 0
        status, ctype, body = _get(server.url + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert 'chatforge_requests_total{model="gpt",rpc="Chat",status="OK"} 1.0' in body
        assert _get(server.url + "/healthz")[0] == 200
        assert _get(server.url + "/readyz")[0] == 503
        ready["value"] = True
        assert _get(server.url + "/readyz")[0] == 200
        assert _get(server.url + "/nope")[0] == 404
        port = server.port
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_readiness_that_raises_reports_not_ready():
    def broken() -> bool:
        raise RuntimeError("engine gone")

    with MetricsHTTPServer(ServingMetrics(process_metrics=False), readiness=broken) as server:
        assert _get(server.url + "/readyz")[0] == 503
        assert _get(server.url + "/healthz")[0] == 200


def test_port_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="start"):
        _ = MetricsHTTPServer(ServingMetrics(process_metrics=False)).port
