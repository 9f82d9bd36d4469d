"""`chatforge sweep` with a --storage optuna cannot open (an unknown URL scheme, an SQLite file in a missing folder) or
an --out that is a file: each ended in a sqlalchemy/FileExistsError traceback. Now one line naming the option. These
fail before any trial trains."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chatforge.cli import app

CONFIG = """name: h5-store
seed: 0
data: {path: sample, valid_fraction: 0.1, test_fraction: 0.0}
tokenizer: {vocab_size: 600}
model: {family: transformer, task: classification, d_model: 32, n_heads: 2, num_encoder_layers: 1, d_ff: 64}
train: {epochs: 1, max_steps: 2, batch_size: 160, num_threads: 1, device: cpu}
tracking: {enabled: false}
output: {dir: OUT}
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG.replace("OUT", str(tmp_path / "runs")))
    (tmp_path / "s.yaml").write_text("model.d_ff: {type: categorical, choices: [32, 64]}\n")
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
