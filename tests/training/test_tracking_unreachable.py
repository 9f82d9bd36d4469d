"""A tracking server that does not answer: `chatforge train` fails in one line naming the store and what to do. Before,
MLflow's own retries (7, exponential backoff) held the run for minutes after the tokenizer was trained, and then it
ended in a urllib3/requests traceback (TrackingError was not among the errors the command reports)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.training.tracking import TrackingError, open_tracker


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(uri: str):
    return validate_config({"name": "t", "data": {"path": "sample"}, "tracking": {"tracking_uri": uri},
                            "model": {"family": "linear", "task": "classification"}})


def test_an_http_store_gets_a_short_retry_budget_unless_one_is_set(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    with pytest.raises(TrackingError, match=r"cannot use the MLflow tracking store http://127\.0\.0\.1:\d+: .*"
                                            r"set tracking\.enabled: false"):
        open_tracker(_cfg(f"http://127.0.0.1:{_closed_port()}"))
    assert (os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) == ("2", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's own setting wins
    with pytest.raises(TrackingError):
        open_tracker(_cfg(f"http://127.0.0.1:{_closed_port()}"))
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


def test_train_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the message, not the wait, is under test here
    config = Path(__file__).resolve().parents[2] / "configs" / "demo_intent.yaml"
    r = CliRunner().invoke(app, ["train", str(config), "--set", f"output.dir={tmp_path}",
                                 "--set", f"tracking.tracking_uri=http://127.0.0.1:{_closed_port()}"])
    assert r.exit_code == 2, r.output
    assert "cannot use the MLflow tracking store" in r.output and "Traceback" not in r.output, r.output
