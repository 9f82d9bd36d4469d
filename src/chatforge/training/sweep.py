"""Hyper-parameter sweeps with Optuna (Akiba et al. 2019, "Optuna: A Next-generation
Hyperparameter Optimization Framework"): TPE sampling, median pruning, RDB storage.

    chatforge sweep configs/demo_intent.yaml --trials 20 --space configs/sweeps/sweep_space.yaml

The space file maps dotted config keys to distributions::

    train.lr:       {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    train.batch_size: {type: int, low: 16, high: 64, step: 16}
    model.d_model:  {type: categorical, choices: [64, 128]}

Each trial is the base config with the suggested values applied as overrides (validated like
``--set``), trained by :func:`~chatforge.training.run.run_experiment` into
``<sweep dir>/trial-<n>`` and tracked as its own MLflow run, tagged with the study and nested
under a parent run for the study. The objective is the best validation loss; a trainer
callback reports it every epoch so the MedianPruner can stop hopeless trials early. The
study lives in ``sqlite:///runs/optuna.db`` by default (the same ``runs/`` folder as the
MLflow store); pass any RDB URL (PostgreSQL, MySQL) so several workers share one study.
The best trial's full config is written to ``<sweep dir>/best_config.yaml``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from chatforge.config import ConfigError, ExperimentConfig, apply_overrides, read_yaml, validate_config
from chatforge.fileio import atomic_write_bytes
from chatforge.settings import Settings
from chatforge.training.run import run_experiment
from chatforge.training.tracking import open_tracker, run_tags
from chatforge.training.trainer import Callback

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///runs/optuna.db"


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatDist(_Dist):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> FloatDist:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("step and log: true cannot be combined")
        return self

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)


class IntDist(_Dist):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> IntDist:
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("log: true needs low >= 1 and step 1")
        return self

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)


class CategoricalDist(_Dist):
    type: Literal["categorical"]
    choices: list[str | int | float | bool | None] = Field(min_length=1)

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, self.choices)


Distribution = Annotated[FloatDist | IntDist | CategoricalDist, Field(discriminator="type")]
_SPACE = TypeAdapter(dict[str, Distribution])


def parse_space(tree: Any, source: str = "<space>") -> dict[str, FloatDist | IntDist | CategoricalDist]:
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{source}: a sweep space is a non-empty mapping of dotted config keys to "
                          f"distributions, e.g. 'train.lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}'")
    try:
        return _SPACE.validate_python(tree)
    except ValidationError as err:
        lines = [f"{source}: invalid sweep space ({err.error_count()} problem(s)):"]
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"] if p not in ("float", "int", "categorical"))
            lines.append(f"  {loc}: {e['msg']} (allowed types: float, int, categorical; keys: "
                         f"low, high, log, step / choices)")
        raise ConfigError("\n".join(lines)) from None


def load_space(path: str | Path) -> dict[str, FloatDist | IntDist | CategoricalDist]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep space file not found: {path}")
    try:
        tree = read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_space(tree, str(path))


def _override(key: str, value: Any) -> str:
    """``key=value`` in the ``--set`` syntax (the value as YAML, so types survive)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def check_space(base: ExperimentConfig, space: dict[str, Any]) -> None:
    """Fail before any trial if a key is not a config key or a value the space can draw is out of its range: every
    choice of a categorical, both ends of a range, each with the other keys at their first value, must validate."""
    first = {key: dist.choices[0] if isinstance(dist, CategoricalDist) else dist.low for key, dist in space.items()}
    for key, dist in space.items():
        for value in dist.choices if isinstance(dist, CategoricalDist) else (dist.low, dist.high):
            overrides = [_override(k, value if k == key else v) for k, v in first.items()]
            try:
                validate_config(apply_overrides(base.to_dict(), overrides), source="sweep space")
            except ConfigError as e:
                raise ConfigError(f"the sweep space does not fit the config ({key} = {value!r}):\n{e}") from None


class OptunaPruningCallback(Callback):
    """Report each epoch's validation loss to the trial; raise TrialPruned when the pruner says so."""

    def __init__(self, trial, metric: str = "valid_loss"):
        self.trial = trial
        self.metric = metric

    def on_epoch_end(self, trainer, epoch, logs):
        import optuna  # lazy: importing optuna takes seconds; only sweeps need it

        value = logs.get(self.metric, logs.get("train_loss"))
        if value is None or not math.isfinite(value):
            return
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.metric}={value:.4g})")


class SweepInterrupted(RuntimeError):
    """Ctrl-C during a sweep: what the study keeps and where (the CLI prints it and exits 130)."""


@dataclass
class SweepResult:
    study_name: str
    storage: str | None
    best_value: float
    best_params: dict[str, Any]
    best_config_path: Path
    n_trials: int
    sweep_dir: Path


def resolve_storage(storage: str | None) -> str | None:
    """Explicit URL, else the default SQLite file; under CHATFORGE_ENV=test the default is in-memory."""
    if storage:
        return storage

    if not Settings.from_env().production_sinks_enabled:
        log.info("sweep storage: in-memory (CHATFORGE_ENV=test and no explicit --storage)")
        return None
    Path("runs").mkdir(exist_ok=True)
    return DEFAULT_STORAGE


def run_sweep(base: ExperimentConfig, space: dict[str, Any], *, trials: int, storage: str | None = None,
              study_name: str | None = None, sweep_dir: str | Path | None = None, seed: int | None = None,
              callbacks: list[Callback] | None = None) -> SweepResult:
    """Run ``trials`` more trials of the study (created or joined) and write the best config."""
    import optuna  # lazy: importing optuna takes seconds; only sweeps need it

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    check_space(base, space)
    study_name = study_name or f"{base.name}-sweep"
    sweep_dir = Path(sweep_dir) if sweep_dir else Path(base.output.dir) / "sweeps" / study_name
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, or a folder nobody may write
        raise ConfigError(f"sweep folder {sweep_dir}: {e.strerror or e}; give another --out") from None
    storage = resolve_storage(storage)
    try:
        study = optuna.create_study(
            study_name=study_name, storage=storage, direction="minimize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=base.seed if seed is None else seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        )
    except Exception as e:  # noqa: BLE001 - sqlalchemy's errors (unknown dialect, a missing folder, no server)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--storage {storage}: cannot open the study store ({type(e).__name__}: {first}); give "
                          f"an RDB URL optuna can open, e.g. sqlite:///runs/optuna.db (its folder must exist)") from None
    _check_joined_study(study, space, study_name)
    parent = _open_parent_run(base, study_name)

    def objective(trial: optuna.Trial) -> float:
        params = {key: dist.suggest(trial, key) for key, dist in space.items()}
        tree = apply_overrides(base.to_dict(), [_override(k, v) for k, v in params.items()])
        cfg = validate_config(tree, source=f"trial {trial.number}")
        tags = {"optuna.study": study_name, "optuna.trial": str(trial.number)}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent[1]

        result = run_experiment(cfg, run_dir=sweep_dir / f"trial-{trial.number}", tracking_tags=tags,
                                callbacks=[OptunaPruningCallback(trial), *(callbacks or [])])
        trial.set_user_attr("run_dir", str(result.run_dir))
        if "mlflow_run_id" in result.metrics:
            trial.set_user_attr("mlflow_run_id", result.metrics["mlflow_run_id"])
        value = float(result.metrics["best_valid_loss"])
        if not math.isfinite(value):
            raise optuna.TrialPruned("no finite validation loss")
        return value

    status = "FAILED"
    try:
        study.optimize(objective, n_trials=trials, catch=(ConfigError,))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        last = study.trials[-1] if study.trials else None
        cut = last is not None and last.state == optuna.trial.TrialState.FAIL
        where = f"in {storage}; the same command continues it" if storage else \
            "in memory only, now lost (--storage keeps a study)"
        raise SweepInterrupted(
            f"interrupted; study {study_name!r} keeps its {done} completed trial(s) {where}"
            + (f"; {sweep_dir / f'trial-{last.number}'} is the interrupted trial's incomplete run" if cut else "")
        ) from None
    finally:
        if parent is not None:
            parent[0].end(status)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise RuntimeError(f"study {study_name!r}: no trial completed ({len(study.trials)} tried); "
                           f"see the log for each trial's error")
    best = study.best_trial
    best_tree = apply_overrides(base.to_dict(), [_override(k, v) for k, v in best.params.items()])
    best_cfg = validate_config(best_tree, source=f"best trial {best.number}")
    out = sweep_dir / "best_config.yaml"
    header = f"# best of study {study_name!r}: trial {best.number}, valid_loss {best.value:.6g}\n"
    atomic_write_bytes(out, (header + best_cfg.to_yaml()).encode("utf-8"))
    if parent is not None:
        parent[0].log_metrics({"best_valid_loss": best.value}, step=0)
    log.info("study %s: best trial %d valid_loss=%.4g; config written to %s", study_name, best.number,
             best.value, out)
    return SweepResult(study_name=study_name, storage=storage, best_value=float(best.value),
                       best_params=dict(best.params), best_config_path=out, n_trials=len(study.trials),
                       sweep_dir=sweep_dir)


def _check_joined_study(study, space: dict[str, Any], study_name: str) -> None:
    """A joined study's earlier trials drew each key from a distribution; optuna refuses another kind (float/int/
    categorical) or other choices for the same key with a ValueError in the middle of the first trial. Say so up front,
    naming the key and both distributions."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
        check_distribution_compatibility,
    )

    def as_optuna(dist):
        if isinstance(dist, CategoricalDist):
            return CategoricalDistribution(dist.choices)
        cls = FloatDistribution if isinstance(dist, FloatDist) else IntDistribution
        return cls(dist.low, dist.high, log=dist.log, step=dist.step)

    for trial in study.get_trials(deepcopy=False):
        for key, old in trial.distributions.items():
            if key not in space:
                continue
            try:
                check_distribution_compatibility(old, as_optuna(space[key]))
            except ValueError as e:
                raise ConfigError(
                    f"study {study_name!r} already drew {key} from {old} (trial {trial.number}); the space now "
                    f"says {space[key].model_dump(exclude_none=True)}, which optuna cannot mix ({e}). Give the "
                    f"changed space its own study: --study NEW_NAME") from None


def _open_parent_run(base: ExperimentConfig, study_name: str):
    """An MLflow run standing for the whole study, the trials nested under it; None if tracking is off."""

    tracker = open_tracker(base)
    if tracker is None:
        return None
    run_id = tracker.start(f"sweep-{study_name}", run_tags(base, {"optuna.study": study_name}))
    return tracker, run_id
