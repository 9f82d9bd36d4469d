"""Seeds outside what the random generators take are refused by `chatforge config check`, naming the key.

Before, `seed: 99999999999999999999999` passed the check and training failed after reading the data with
"Overflow when unpacking long long" (seed 2**64 - 1 only at the second epoch, when the sampler adds the epoch),
and a linear model's `model.seed: 4294967296` failed after featurising, in scikit-learn's words."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import ConfigError, validate_config

SEED_MAX = 2**32 - 1


def _tree(run_seed=0, family="transformer", **model):
    return {"name": "t", "seed": run_seed, "data": {"path": "sample"},
            "model": {"family": family, "task": "classification", **model}}


@pytest.mark.parametrize("seed", [2**64 - 1, 2**64, 10**23, -1])
def test_run_seed_out_of_range_is_refused(seed):
    with pytest.raises(ConfigError, match=r"(?s)\bseed\b.*(4294967295|greater than or equal to 0)"):
        validate_config(_tree(seed))


@pytest.mark.parametrize("family", ["linear", "xgboost", "retrieval"])
def test_estimator_seed_out_of_range_is_refused(family):
    extra = {"task": "selection"} if family == "retrieval" else {}
    tree = _tree(0, family, seed=SEED_MAX + 1)
    tree["model"].update(extra)
    with pytest.raises(ConfigError, match=r"model\.seed.*4294967295"):
        validate_config(tree)
    tree["model"]["seed"] = SEED_MAX
    validate_config(tree)


def test_largest_seed_is_accepted_and_cli_names_the_key(tmp_path):
    assert validate_config(_tree(SEED_MAX)).seed == SEED_MAX
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\nseed: 99999999999999999999999\ndata: {path: sample}\n"
                   "model: {family: transformer, task: classification}\n")
    r = CliRunner().invoke(app, ["config", "check", str(cfg)])
    assert r.exit_code == 2 and "seed:" in r.output and "Overflow" not in r.output
