"""`chatforge sweep` with a --storage optuna cannot open (an unknown URL scheme, an SQLite file in a missing folder) or
an --out that is a file: each ended in a sqlalchemy/FileExistsError traceback. Now one line naming the option. These
fail before any trial trains."""

from __future__ import annotations

import pytest
from tests.training.sweep_helpers import write_tiny_sweep
from typer.testing import CliRunner

from chatforge.cli import app


@pytest.fixture
def files(tmp_path):
    write_tiny_sweep(tmp_path, "h5-store", "s.yaml")
    return tmp_path


def _sweep(tmp_path, *extra):
    return CliRunner().invoke(app, ["sweep", str(tmp_path / "c.yaml"), "--space", str(tmp_path / "s.yaml"),
                                    "--trials", "1", *extra])


@pytest.mark.parametrize("url", ["bogus://x", "sqlite:///{tmp}/no/such/folder/optuna.db"])
def test_a_storage_that_cannot_be_opened_is_named(files, url):
    url = url.format(tmp=files)
    r = _sweep(files, "--storage", url)
    assert r.exit_code == 2, (r.output, r.exception)
    assert f"--storage {url}: cannot open the study store" in " ".join(r.output.split())
    assert not list((files / "runs").glob("sweeps/*/trial-*"))


def test_an_out_that_is_a_file_is_named(files):
    (files / "taken").write_text("keep me")
    r = _sweep(files, "--storage", f"sqlite:///{files}/optuna.db", "--out", str(files / "taken"))
    assert r.exit_code == 2, (r.output, r.exception)
    assert f"sweep folder {files / 'taken'}" in " ".join(r.output.split())
    assert (files / "taken").read_text() == "keep me"
