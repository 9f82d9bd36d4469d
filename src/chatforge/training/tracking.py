"""Experiment tracking with MLflow: params, features, per-epoch metrics, artifacts, tags.

Every run logs
  params     the resolved config flattened to dotted keys (``model.d_model``), plus ``features.*``:
             tokenizer settings and sha256, data path and sha256, example counts;
  metrics    each epoch's logs (train/valid loss and accuracy, lr) at the optimizer step;
  artifacts  the bundle folder, metrics.json, config.yaml and any PNG plots of the run folder;
  tags       git commit of the chatforge sources (when in a git checkout), chatforge version,
             family, task, and whatever the caller adds (a sweep adds its study).

Where: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.tracking_uri``, else the local SQLite
store ``sqlite:///runs/mlflow.db`` (relative to the working directory) with artifacts beside it
in ``runs/mlartifacts``. Under ``CHATFORGE_ENV=test`` only an explicit ``tracking.tracking_uri``
is used: the default store and the environment variable are ignored (tracking is skipped), so a
test can never write into a developer's or the team's store. mlflow is imported lazily (it
takes seconds), and ``tracking.enabled: false`` never imports it at all.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import chatforge
from chatforge.config import ExperimentConfig, TrackingConfig
from chatforge.fileio import process_tag
from chatforge.settings import Settings
from chatforge.training.trainer import Callback

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
ENV_VAR = "MLFLOW_TRACKING_URI"
RUN_ID_FILE = "mlflow_run_id"
# MLflow caps a batch at 100 params / 1000 metrics and a param value at 6000 characters.
_PARAM_BATCH, _PARAM_MAX = 100, 6000


class TrackingError(RuntimeError):
    pass


def _test_mode() -> bool:
    return not Settings.from_env().production_sinks_enabled


def resolve_tracking_uri(cfg: TrackingConfig, environ: dict[str, str] | None = None) -> str | None:
    """The URI to track to, or None when tracking must not happen (disabled, or test mode by default)."""
    if not cfg.enabled:
        return None
    environ = os.environ if environ is None else environ
    if _test_mode():
        if cfg.tracking_uri is None:
            log.info("tracking skipped: CHATFORGE_ENV=test and no explicit tracking.tracking_uri")
        return cfg.tracking_uri
    return environ.get(ENV_VAR) or cfg.tracking_uri or DEFAULT_TRACKING_URI


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def default_artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go in ``mlartifacts/`` beside the database file."""
    db = _sqlite_file(uri)
    if db is None:
        return None
    return (db.resolve().parent / "mlartifacts").as_uri()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = tree
    return out


def git_commit(path: Path | None = None) -> str | None:
    """HEAD of the git checkout holding ``path`` (default: the chatforge sources), else None."""
    where = path or Path(chatforge.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


class MLflowTracker:
    """One MLflow run, driven through ``MlflowClient`` (no global active-run state, so sweeps and
    threads cannot cross-log)."""

    def __init__(self, uri: str, experiment: str, *, artifact_location: str | None = None):
        from mlflow.tracking import MlflowClient  # lazy: importing mlflow takes seconds

        db = _sqlite_file(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=artifact_location or default_artifact_location(uri))
            except Exception:  # another worker created it first (sweeps run in parallel)
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id
        self.run_id: str | None = None

    def start(self, run_name: str, tags: dict[str, str], *, resume_run_id: str | None = None) -> str:
        # Which process trains the run (``chatforge.host``/``chatforge.pid``): a run killed by a signal that lets no
        # code run stays RUNNING in MLflow, and ``chatforge compare`` reads it as killed once that process is gone.
        me = {f"chatforge.{k}": str(v) for k, v in process_tag().items()}
        if resume_run_id:
            self.client.update_run(resume_run_id, status="RUNNING")
            self.run_id = resume_run_id
            self.set_tags(me)
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**tags, **me})
            self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # lazy: importing mlflow takes seconds; only tracked runs need it

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _PARAM_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag  # lazy: importing mlflow takes seconds; only tracked runs need it

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # lazy: importing mlflow takes seconds; only tracked runs need it

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def _param_value(v: Any) -> str:
    s = "null" if v is None else str(v)
    return s if len(s) <= _PARAM_MAX else s[: _PARAM_MAX - 3] + "..."


def short_http_retries(uri: str) -> None:
    """For an http(s) tracking URI: 2 retries with backoff 1 unless MLFLOW_HTTP_REQUEST_* say otherwise. MLflow's own
    default (7, exponential backoff) held a run or a leaderboard for minutes when the server was down or mistyped."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def open_tracker(cfg: ExperimentConfig) -> MLflowTracker | None:
    """An :class:`MLflowTracker` for ``cfg``, or None when tracking is off (see module doc)."""
    uri = resolve_tracking_uri(cfg.tracking)
    if uri is None:
        return None
    short_http_retries(uri)
    try:
        return MLflowTracker(uri, cfg.tracking.experiment or cfg.name,
                             artifact_location=cfg.tracking.artifact_location)
    except ImportError as e:
        raise TrackingError(f"tracking.enabled is true but mlflow is not installed ({e}); "
                            f"pip install mlflow-skinny alembic, or set tracking.enabled: false") from None
    except Exception as e:  # noqa: BLE001 - MlflowException, or requests' connection errors (OSError)
        reason = " ".join(str(e).split())[:300]
        raise TrackingError(f"cannot use the MLflow tracking store {uri}: {reason}; start the server or fix "
                            "tracking.tracking_uri (or MLFLOW_TRACKING_URI), or set tracking.enabled: false") from None


def run_tags(cfg: ExperimentConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    tags = {"chatforge.version": chatforge.__version__, "family": cfg.model.family, "task": cfg.model.task}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags.update(extra or {})
    return tags


class TrackingCallback(Callback):
    """Trainer callback logging each epoch's metrics at the current optimizer step."""

    def __init__(self, tracker: MLflowTracker):
        self.tracker = tracker

    def on_epoch_end(self, trainer, epoch, logs):
        self.tracker.log_metrics(logs, step=trainer.step)


def log_run_outputs(tracker: MLflowTracker, run_dir: Path, metrics: dict[str, Any], *, log_bundle: bool) -> None:
    """Final metrics and the run's artifacts: bundle, metrics.json, config.yaml, plots."""
    final = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics({f"final_{k}": v for k, v in final.items()}, step=int(metrics.get("steps", 0)))
    for name in ("metrics.json", "config.yaml"):
        tracker.log_artifact(run_dir / name)
    for png in sorted(run_dir.glob("*.png")):
        tracker.log_artifact(png, artifact_path="plots")
    if log_bundle and (run_dir / "bundle").is_dir():
        tracker.log_artifact(run_dir / "bundle", artifact_path="bundle")
