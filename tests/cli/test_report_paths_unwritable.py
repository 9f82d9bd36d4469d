"""`chatforge evaluate --out`, `chatforge compare --md/--csv/--plot` and `tokenizer train --out` to a path that cannot be written (under a
file, in /proc) fail in one line naming the path, exit 2. Before, each ended in a traceback (NotADirectoryError,
'FileExistsError: File exists' for a parent that is a file, FileNotFoundError for a temp file)."""

from __future__ import annotations

import pytest
from tests.evaluation.test_compare import make_run
from tests.test_oos import intent_cfg
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.training.run import run_experiment


@pytest.fixture
def blocker(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    return f


def test_evaluate_out_under_a_file(tmp_path, blocker):
    run = run_experiment(validate_config(intent_cfg(tmp_path)), run_dir=tmp_path / "run")
    r = CliRunner().invoke(app, ["evaluate", str(run.bundle_dir), "--out", str(blocker / "out")])
    assert r.exit_code == 2, r.output
    assert "cannot write" in r.output and str(blocker) in r.output.replace("\n", "") and "Traceback" not in r.output


@pytest.mark.parametrize("option", ["--md", "--csv", "--plot"])
def test_compare_outputs_under_a_file(tmp_path, blocker, option):
    make_run(tmp_path / "runs", "a-linear", "linear", 0.92, 0.40, 0.1)
    r = CliRunner().invoke(app, ["compare", "--runs-dir", str(tmp_path / "runs"), option, str(blocker / "x")])
    assert r.exit_code == 2, r.output
    assert "cannot write" in r.output and "Traceback" not in r.output


def test_tokenizer_out_under_a_file(tmp_path, blocker):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"sentence number {i} here,a\n" for i in range(40)))
    r = CliRunner().invoke(app, ["tokenizer", "train", "--data", str(data), "--vocab-size", "40",
                                 "--lower-if-too-large", "--out", str(blocker / "t.model")])
    assert r.exit_code == 2, r.output
    assert "cannot write" in r.output and "Traceback" not in r.output
