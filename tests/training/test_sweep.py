"""Optuna sweeps: the space file, pruning, and a 3-trial study end to end."""

from __future__ import annotations

import pytest
import yaml

from chatforge.config import ConfigError, load_config, validate_config
from chatforge.training.sweep import OptunaPruningCallback, check_space, load_space, parse_space, run_sweep


def _tree(tmp_path, uri: str | None) -> dict:
    return {
        "name": "swept", "seed": 0,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.0},
        "tokenizer": {"vocab_size": 600},
        "model": {"family": "transformer", "task": "classification", "d_model": 32, "n_heads": 2,
                  "num_encoder_layers": 1, "d_ff": 64, "dropout": 0.0},
        "train": {"epochs": 2, "max_steps": 4, "batch_size": 160, "num_threads": 1, "device": "cpu"},
        "tracking": {"enabled": uri is not None, "tracking_uri": uri},
        "output": {"dir": str(tmp_path / "runs")},
    }


SPACE = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "model.num_encoder_layers": {"type": "int", "low": 1, "high": 2},
    "model.d_ff": {"type": "categorical", "choices": [32, 64]},
}


def test_space_parsing_and_errors(tmp_path):
    space = parse_space(SPACE)
    assert space["train.lr"].log and space["model.num_encoder_layers"].high == 2
    with pytest.raises(ConfigError, match="low \\(0.0\\) must be < high"):
        parse_space({"train.lr": {"type": "float", "low": 0.0, "high": 0.0}})
    with pytest.raises(ConfigError, match="log: true needs low > 0"):
        parse_space({"train.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}})
    with pytest.raises(ConfigError, match="allowed types: float, int, categorical"):
        parse_space({"train.lr": {"type": "gaussian", "low": 0.0, "high": 1.0}})
    with pytest.raises(ConfigError, match="non-empty mapping"):
        parse_space([])
    with pytest.raises(ConfigError, match="not found"):
        load_space(tmp_path / "nope.yaml")
    base = validate_config(_tree(tmp_path, None))
    with pytest.raises(ConfigError, match="train.learning_rate: unknown key"):
        check_space(base, parse_space({"train.learning_rate": {"type": "float", "low": 0.1, "high": 0.2}}))
    check_space(base, space)


def test_shipped_space_fits_the_demo_config():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    space = load_space(root / "configs" / "sweeps" / "sweep_space.yaml")
    check_space(load_config(root / "configs" / "demo_intent.yaml"), space)


class _Trial:
    def __init__(self, prune_at: int):
        self.reports, self.prune_at = [], prune_at

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return len(self.reports) >= self.prune_at


def test_pruning_callback_reports_valid_loss_and_raises():
    import optuna

    trial = _Trial(prune_at=2)
    cb = OptunaPruningCallback(trial)
    cb.on_epoch_end(None, 1, {"train_loss": 2.0, "valid_loss": 1.5})
    with pytest.raises(optuna.TrialPruned):
        cb.on_epoch_end(None, 2, {"train_loss": 1.0, "valid_loss": 1.2})
    assert trial.reports == [(1, 1.5), (2, 1.2)]


@pytest.mark.slow
def test_three_trial_sweep_writes_valid_best_config_and_tracks_trials(tmp_path):
    import optuna

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"sqlite:///{tmp_path}/optuna.db"
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(SPACE), encoding="utf-8")
    base = validate_config(_tree(tmp_path, uri))
    res = run_sweep(base, load_space(space_file), trials=3, storage=storage, sweep_dir=tmp_path / "sweep")

    best = load_config(res.best_config_path)  # validates
    assert best.train.lr == pytest.approx(res.best_params["train.lr"])
    assert best.model.params["num_encoder_layers"] == res.best_params["model.num_encoder_layers"]
    assert best.name == "swept" and best.train.max_steps == 4

    study = optuna.load_study(study_name="swept-sweep", storage=storage)
    assert len(study.trials) == 3 and res.n_trials == 3
    states = {t.state for t in study.trials}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert study.best_value == pytest.approx(res.best_value)
    assert (tmp_path / "sweep" / f"trial-{study.best_trial.number}" / "bundle").is_dir()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("swept")
    runs = client.search_runs([exp.experiment_id], "tags.`optuna.study` = 'swept-sweep'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(trials) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    assert sorted(r.data.tags["optuna.trial"] for r in trials) == ["0", "1", "2"]
