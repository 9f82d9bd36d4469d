"""`chatforge compare --tracking-uri` naming a local SQLite store that does not exist is refused, and nothing is created.
Before, a mistyped `sqlite:///runs/mlfow.db` created a new empty MLflow database (and its folders) there, then
answered "no runs to compare"."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.evaluation.compare import CompareError, collect_mlflow


def test_missing_local_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/nope/mlflow.db"
    with pytest.raises(CompareError, match="no MLflow store"):
        collect_mlflow(uri)
    assert not (tmp_path / "nope").exists()
    r = CliRunner().invoke(app, ["compare", "--tracking-uri", uri])
    assert r.exit_code == 2 and "no MLflow store" in r.output and not (tmp_path / "nope").exists()
