"""`chatforge compare` in a terminal too narrow for every column shows the columns that fit, whole, and names
the ones it left out. Before, rich squeezed all 20-odd columns into 80 characters: every cell, run names and the
ranked metric included, was an ellipsis, so the leaderboard printed nothing readable."""

from __future__ import annotations

import pytest
from tests.evaluation.test_compare import make_run
from typer.testing import CliRunner

from chatforge.cli import _shared, app


@pytest.fixture
def runs(tmp_path):
    make_run(tmp_path, "a-linear-baseline", "linear", 0.9213, 0.40, 0.1, history=False)
    make_run(tmp_path, "b-transformer-big", "transformer", 0.9547, 0.30, 0.001)
    return tmp_path


@pytest.mark.parametrize("width", [80, 120])
def test_narrow_terminal_keeps_names_and_metric_whole(runs, monkeypatch, width):
    monkeypatch.setattr(_shared.console, "width", width)
    r = CliRunner().invoke(app, ["compare", "--runs-dir", str(runs), "--metric", "in_scope_accuracy"])
    assert r.exit_code == 0, r.output
    assert "b-transformer-big" in r.output and "a-linear-baseline" in r.output
    assert "0.9547" in r.output and "0.9213" in r.output
    assert "left out" in r.output and "--md" in r.output
    assert max(len(line) for line in r.output.splitlines()) <= width


def test_wide_terminal_shows_every_column(runs, monkeypatch):
    monkeypatch.setattr(_shared.console, "width", 1000)
    r = CliRunner().invoke(app, ["compare", "--runs-dir", str(runs)])
    assert r.exit_code == 0 and "left out" not in r.output and "train.lr" in r.output
