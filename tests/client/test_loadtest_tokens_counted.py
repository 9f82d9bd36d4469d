"""The load test counts the tokens a model generated (the server's count), not the chunks of a stream.

A retrieval (or scripted, or fallback) reply arrives as one chunk: counted as one "token", a run of them reported a
tokens/s equal to its request rate, and a mix of paths an average of two different things.
"""

from __future__ import annotations

import csv
import json

import pytest
from tests.serving.test_policy import FakeSelector
from tests.serving_fakes import WAIT, ServerThread, make_engine
from typer.testing import CliRunner

from chatforge.client.loadtest import LoadTestConfig, run_load_test, write_report


@pytest.fixture(scope="module")
def server():
    with ServerThread(make_engine(retrievers={"selector": FakeSelector()}), http_port=0) as st:
        st.wait_serving()
        yield st


def _run(server, protocol: str, model: str | None):
    target = server.target if protocol == "grpc" else f"127.0.0.1:{server.server.http.port}"
    report = run_load_test(LoadTestConfig(target=target, rpc="reply", requests=6, concurrency=2, model=model,
                                          texts=["how is the weather", "hello"], timeout=WAIT, protocol=protocol))
    assert report.ok == 6, report.error_messages()
    return report


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_retrieval_replies_generate_no_tokens(server, protocol):
    report = _run(server, protocol, "selector")  # a selection model: its best pool answer, as one chunk
    assert all(r.tokens == 0 and r.ttft is not None for r in report.results)
    tok = report.to_dict()["tokens"]
    assert tok["total"] == 0 and tok["per_second"] == 0 and tok["replies_generated"] == 0
    assert tok["stream_decode_rate_mean"] is None
    assert "reported" in tok["counted"] and "retrieval" in tok["counted"]
    if protocol == "grpc":  # the gRPC final chunk names the path; an HTTP stream does not
        assert tok["replies_by_path"] == {"retrieval": 6}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generated_replies_count_the_servers_tokens(server, protocol):
    report = _run(server, protocol, None)  # the fake generator: 4 tokens
    tok = report.to_dict()["tokens"]
    assert [r.tokens for r in report.results] == [4] * 6
    assert tok["total"] == 24 and tok["replies_generated"] == 6 and tok["replies_by_path"] == {"generation": 6}


def test_the_report_files_and_the_cli_say_which_path_answered(server, tmp_path):
    paths = write_report(_run(server, "grpc", "selector"), tmp_path, plot=False)
    with paths["csv"].open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["tokens"], r["path"]) for r in rows} == {("0", "retrieval")}
    assert json.loads(paths["json"].read_text())["tokens"]["replies_by_path"] == {"retrieval": 6}

    from chatforge.cli import app

    result = CliRunner().invoke(app, ["loadtest", server.target, "--requests", "4", "--model", "selector"])
    assert result.exit_code == 0, result.output
    assert "tokens generated (by models)" in result.output and "retrieval 4" in result.output
