"""`chatforge sweep` joins its study when it exists (the default name is <config name>-sweep, in runs/optuna.db):
rerunning it after editing the space so that a key changes kind (categorical -> int) or choices stopped the sweep
with optuna's "Cannot set different distribution kind to the same parameter name." ValueError traceback, in the
middle of a trial. It is now a one-line error naming the key, both distributions and --study."""

from __future__ import annotations

import pytest
from tests.training.sweep_helpers import write_tiny_sweep
from typer.testing import CliRunner

from chatforge.cli import app


@pytest.fixture
def study(tmp_path):
    write_tiny_sweep(tmp_path, "h5-joined", "s1.yaml")
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
