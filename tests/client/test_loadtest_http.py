"""``chatforge loadtest --protocol http``: the same load test over the OpenAI-compatible surface."""

from __future__ import annotations

import json

import pytest
from tests.serving_fakes import ServerThread, make_engine
from typer.testing import CliRunner

from chatforge.client.loadtest import LoadTestConfig, LoadTestError, run_load_test
from chatforge.serving.metrics import ServingMetrics


@pytest.fixture(scope="module")
def server():
    with ServerThread(make_engine(), metrics=ServingMetrics(), http_port=0) as st:
        st.wait_serving()
        yield st


def _http_target(st) -> str:
    return f"127.0.0.1:{st.server.http.port}"


def test_http_reply_streams_are_measured_like_grpc(server):
    texts = ["hello there", "bye now", "how are you"]
    reports = {}
    for protocol, target in (("grpc", server.target), ("http", _http_target(server))):
        reports[protocol] = run_load_test(LoadTestConfig(target=target, protocol=protocol, rpc="reply", concurrency=3,
                                                         requests=12, texts=texts, timeout=10.0))
    http, grpc = reports["http"], reports["grpc"]
    assert http.status_counts() == {"OK": 12} == grpc.status_counts()
    # The fake streams 4 tokens: both surfaces count them one by one, with a TTFT inside each call.
    assert all(r.tokens == 4 and r.ttft is not None and 0 < r.ttft <= r.latency for r in http.results)
    assert http.to_dict()["tokens"]["total"] == grpc.to_dict()["tokens"]["total"] == 48
    assert http.to_dict()["protocol"] == "http" and grpc.to_dict()["protocol"] == "grpc"


def test_http_errors_are_counted_by_http_status(server):
    report = run_load_test(LoadTestConfig(target=_http_target(server), protocol="http", rpc="classify",
                                          requests=6, texts=["hello", "x" * 300], timeout=10.0))
    assert report.status_counts() == {"OK": 3, "HTTP_400": 3}
    health = run_load_test(LoadTestConfig(target=_http_target(server), protocol="http", rpc="health",
                                          requests=3, timeout=10.0))
    assert health.status_counts() == {"OK": 3}


def test_unknown_protocol_is_refused():
    with pytest.raises(LoadTestError, match="protocol='ws' is unknown; allowed: grpc, http"):
        LoadTestConfig(target="h:1", protocol="ws", rpc="health", requests=1).validate()


def test_cli_protocol_http(server, tmp_path):
    from chatforge.cli import app

    r = CliRunner().invoke(app, ["loadtest", _http_target(server), "--protocol", "http", "--requests", "4",
                                 "--concurrency", "2", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["protocol"] == "http" and data["ok"] == 4 and data["tokens"]["total"] == 16


def test_http_load_test_sends_the_api_key():
    # --api-key (harden-cli) and --protocol http (http) together: the HTTP clients carry the key too.
    from chatforge.serving.security import ApiKeyAuth

    with ServerThread(make_engine(), http_port=0, auth=ApiKeyAuth(["s3cret"])) as st:
        st.wait_serving()
        base = dict(target=_http_target(st), protocol="http", rpc="classify", requests=2, texts=["hello"],
                    timeout=10.0)
        assert run_load_test(LoadTestConfig(**base)).status_counts() == {"HTTP_401": 2}
        assert run_load_test(LoadTestConfig(**base, api_key="s3cret")).status_counts() == {"OK": 2}
