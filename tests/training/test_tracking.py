"""MLflow tracking: where runs go (and never go under test), and what a tracked run holds."""

from __future__ import annotations

import json

import pytest

from chatforge.config import TrackingConfig, validate_config
from chatforge.training.run import run_experiment
from chatforge.training.tracking import (
    DEFAULT_TRACKING_URI,
    default_artifact_location,
    flatten,
    git_commit,
    open_tracker,
    resolve_tracking_uri,
)


def test_uri_resolution_in_test_mode_never_uses_default_or_env(monkeypatch):
    monkeypatch.setenv("CHATFORGE_ENV", "test")
    env = {"MLFLOW_TRACKING_URI": "http://team-server:5000"}
    assert resolve_tracking_uri(TrackingConfig(), env) is None
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///x.db"), env) == "sqlite:///x.db"
    assert resolve_tracking_uri(TrackingConfig(enabled=False, tracking_uri="sqlite:///x.db"), env) is None


def test_uri_resolution_outside_tests_env_wins(monkeypatch):
    monkeypatch.setenv("CHATFORGE_ENV", "development")
    assert resolve_tracking_uri(TrackingConfig(), {}) == DEFAULT_TRACKING_URI == "sqlite:///runs/mlflow.db"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///a.db"), {}) == "sqlite:///a.db"
    env = {"MLFLOW_TRACKING_URI": "http://team-server:5000"}
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///a.db"), env) == "http://team-server:5000"
    assert resolve_tracking_uri(TrackingConfig(enabled=False), env) is None


def test_flatten_and_artifact_location(tmp_path):
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": [1, 2], "d": None}
    loc = default_artifact_location(f"sqlite:///{tmp_path}/m.db")
    assert loc == (tmp_path / "mlartifacts").as_uri()
    assert default_artifact_location("http://server:5000") is None


def test_unknown_tracking_key_is_rejected():
    with pytest.raises(ValueError, match="tracking.uri: unknown key; allowed keys here: enabled, tracking_uri"):
        validate_config({"name": "x", "data": {"path": "sample"},
                         "model": {"family": "transformer", "task": "classification"},
                         "tracking": {"uri": "sqlite:///a.db"}})


def _tree(tmp_path, uri: str | None, enabled: bool = True) -> dict:
    return {
        "name": "tracked", "seed": 0,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.0},
        "tokenizer": {"vocab_size": 600},
        "model": {"family": "transformer", "task": "classification", "d_model": 32, "n_heads": 2,
                  "num_encoder_layers": 1, "d_ff": 64, "dropout": 0.0},
        "train": {"epochs": 2, "max_steps": 6, "batch_size": 160, "num_threads": 1, "device": "cpu"},
        "tracking": {"enabled": enabled, "tracking_uri": uri},
        "output": {"dir": str(tmp_path / "runs")},
    }


def test_tracking_disabled_or_default_under_test_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_tracker(validate_config(_tree(tmp_path, None))) is None
    res = run_experiment(validate_config(_tree(tmp_path, f"sqlite:///{tmp_path}/m.db", enabled=False)),
                         run_dir=tmp_path / "runs" / "off")
    assert "mlflow_run_id" not in res.metrics
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "runs" / "mlflow.db").exists()
    assert not (tmp_path / "runs" / "off" / "mlflow_run_id").exists()


@pytest.mark.slow
def test_tracked_run_logs_params_features_metrics_artifacts_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_experiment(validate_config(_tree(tmp_path, uri)), run_dir=tmp_path / "runs" / "r1")
    run_id = res.metrics["mlflow_run_id"]
    assert (tmp_path / "runs" / "r1" / "mlflow_run_id").read_text() == run_id

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tracked"
    p = run.data.params
    assert p["model.d_model"] == "32" and p["train.max_steps"] == "6" and p["data.path"] == "sample"
    meta = json.loads((res.bundle_dir / "metadata.json").read_text())
    assert p["features.data.sha256"] == meta["data_sha256"]
    assert p["features.tokenizer.sha256"] == meta["tokenizer"]["sha256"]
    assert p["features.tokenizer.vocab_size"] == str(meta["tokenizer"]["vocab_size"])
    t = run.data.tags
    assert t["family"] == "transformer" and t["task"] == "classification" and t["chatforge.version"]
    assert t.get("mlflow.source.git.commit") == git_commit()  # None outside a git checkout
    hist = client.get_metric_history(run_id, "valid_loss")
    assert [m.step for m in hist] == [5, 6]  # 646 examples / 160 = 5 batches in epoch 1, then max_steps
    assert [m.value for m in hist] == pytest.approx([h["valid_loss"] for h in res.metrics["history"]])
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"bundle", "metrics.json", "config.yaml"} <= names
    assert {a.path for a in client.list_artifacts(run_id, "bundle")} >= {"bundle/weights.safetensors"}
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # the explicit URI, not the default location


@pytest.mark.slow
def test_a_run_stopped_with_ctrl_c_is_killed_in_mlflow_not_failed(tmp_path, monkeypatch):
    from chatforge.training.trainer import Callback

    class CtrlC(Callback):
        def on_step_end(self, trainer, step, logs):
            raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(validate_config(_tree(tmp_path, uri)), run_dir=tmp_path / "runs" / "r1", callbacks=[CtrlC()])
    from mlflow.tracking import MlflowClient

    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "KILLED"
