"""`chatforge sweep` joins its study when it exists (the default name is <config name>-sweep, in runs/optuna.db):
rerunning it after editing the space so that a key changes kind (categorical -> int) or choices stopped the sweep
with optuna's "Cannot set different distribution kind to the same parameter name." ValueError traceback, in the
middle of a trial. It is now a one-line error naming the key, both distributions and --study."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chatforge.cli import app

CONFIG = """name: h5-joined
seed: 0
data: {path: sample, valid_fraction: 0.1, test_fraction: 0.0}
tokenizer: {vocab_size: 600}
model: {family: transformer, task: classification, d_model: 32, n_heads: 2, num_encoder_layers: 1, d_ff: 64,
        dropout: 0.0}
train: {epochs: 1, max_steps: 2, batch_size: 160, num_threads: 1, device: cpu}
tracking: {enabled: false}
output: {dir: OUT}
"""


@pytest.fixture
def study(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG.replace("OUT", str(tmp_path / "runs")))
    (tmp_path / "s1.yaml").write_text("model.d_ff: {type: categorical, choices: [32, 64]}\n")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "c.yaml"), "--space", str(tmp_path / "s1.yaml"),
                                 "--trials", "1", "--storage", storage])
    assert r.exit_code == 0, (r.output, r.exception)
    return tmp_path, storage


@pytest.mark.parametrize("edited", ["{type: int, low: 32, high: 64}", "{type: categorical, choices: [32, 48]}"])
def test_an_edited_space_that_optuna_cannot_join_is_named_before_any_trial(study, edited):
    import optuna

    tmp_path, storage = study
    (tmp_path / "s2.yaml").write_text(f"model.d_ff: {edited}\n")
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "c.yaml"), "--space", str(tmp_path / "s2.yaml"),
                                 "--trials", "1", "--storage", storage])
    assert r.exit_code == 2, (r.output, r.exception)
    out = " ".join(r.output.split())
    assert "study 'h5-joined-sweep' already drew model.d_ff" in out and "--study" in out
    assert len(optuna.load_study(study_name="h5-joined-sweep", storage=storage).trials) == 1  # no failed trial added


def test_a_new_range_of_the_same_kind_still_joins(study):
    tmp_path, storage = study
    (tmp_path / "s3.yaml").write_text("model.d_ff: {type: categorical, choices: [32, 64]}\n"
                                      "train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "c.yaml"), "--space", str(tmp_path / "s3.yaml"),
                                 "--trials", "1", "--storage", storage])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "(2 trials)" in " ".join(r.output.split())
