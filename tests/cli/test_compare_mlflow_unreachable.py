"""`chatforge compare --tracking-uri http://HOST` with no MLflow server there fails within seconds in one line.
Before, MLflow's default HTTP retries (7, exponential backoff) held the command for over three minutes and it
then ended in a traceback (ConnectionRefusedError ... MlflowException)."""

from __future__ import annotations

import socket
import time

from typer.testing import CliRunner

from chatforge.cli import app


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server(monkeypatch):
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(var, "0")  # recorded, so what the command sets is undone after the test
        monkeypatch.delenv(var)
    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["compare", "--tracking-uri", uri])
    assert time.monotonic() - t0 < 30
    assert r.exit_code == 2, r.output
    assert f"cannot read MLflow runs from {uri}" in r.output and "Traceback" not in r.output
