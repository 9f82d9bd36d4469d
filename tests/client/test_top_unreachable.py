"""`chatforge top` against a target that does not answer: one error line saying what failed and what to check, not
an empty table above urllib's "<urlopen error [Errno 111] Connection refused>"; a wrong path says its HTTP status."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.inference import ModelInfo
from chatforge.serving.metrics import MetricsHTTPServer, ServingMetrics


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_target_is_one_line_without_a_table():
    r = CliRunner().invoke(app, ["top", f"127.0.0.1:{_closed_port()}", "--count", "1"], env={"COLUMNS": "160"})
    assert r.exit_code == 1, r.output
    assert "chatforge top" not in r.output and "┃" not in r.output, r.output  # no table drawn
    assert "Connection refused (is a server running there with --metrics-port?)" in r.output
    assert "urlopen error" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_a_wrong_path_names_the_http_status():
    m = ServingMetrics()
    m.set_model_info(ModelInfo("chat", "fake", "generation"))
    with MetricsHTTPServer(m) as srv:
        r = CliRunner().invoke(app, ["top", f"http://127.0.0.1:{srv.port}/nope", "--count", "1"])
    assert r.exit_code == 1 and "HTTP 404" in r.output, r.output
