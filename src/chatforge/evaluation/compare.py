"""``chatforge compare``: a leaderboard over runs, so results never live in a spreadsheet.

A run is a folder written by ``chatforge train`` (``config.yaml``, ``metrics.json``, ``bundle/``)
plus the reports ``chatforge evaluate`` put in ``<run>/eval/<data>-<split>/evaluation.json``. The
leaderboard puts one evaluation split side by side for every run (the split most runs were
evaluated on unless ``split`` is given; a run without it falls back to its training-time
``metrics.json`` numbers of that same split, marked by the ``source`` column, or shows none; an evaluation of a
file other than the run's training data is the split ``SPLIT of FILE``), with the parameters that differ between
runs, training time, latency per example and bundle size. Runs can also come from MLflow.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chatforge.data import sample_corpus_path
from chatforge.evaluation.plots import text_fonts
from chatforge.evaluation.report import _md_table, md_text
from chatforge.fileio import atomic_write_bytes, atomic_write_text, process_gone
from chatforge.training.status import FINISHED, KILLED, read_status

logger = logging.getLogger(__name__)

METRICS = ("in_scope_accuracy", "oos_recall", "cross_fitted_in_scope_accuracy", "cross_fitted_oos_recall",
           "accuracy", "macro_f1", "r1_of_10", "r1_of_100", "mrr_of_10", "chrf", "bleu", "perplexity",
           "distinct_1", "distinct_2", "repeat_3_rate", "identical_rate")
# The development test a predefined (CLINC150) split holds out of its train lists (data.dev_fraction): a column
# of its own beside whatever split the leaderboard ranks on, from ``chatforge evaluate --split dev`` when the run
# has one, else from the run's metrics.json.
DEV_METRICS = ("dev_in_scope_accuracy", "dev_oos_recall", "dev_accuracy")
CROSS_FITTED = "cross_fitted_"  # from an evaluation's metrics["cross_fitted"] (chatforge evaluate --cross-fit)
# Tasks whose metrics.json accuracy is next-token (or masked-token) accuracy: not comparable with a classifier's.
TOKEN_ACCURACY_TASKS = frozenset({"generation", "lm", "mlm", "mlm_nsp"})
LOWER_IS_BETTER = {"perplexity", "latency_ms", "valid_loss", "repeat_3_rate", "identical_rate"}
# Config keys that name things rather than choose them: never "parameters" of a comparison.
_IGNORED_PARAMS = ("name", "output.", "tracking.", "data.path")


class CompareError(ValueError):
    pass


@dataclass
class RunRecord:
    """Everything known about one run (from its folder or from MLflow)."""

    run: str
    name: str
    family: str
    task: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json (training time)
    evaluations: list[dict] = field(default_factory=list)  # evaluation.json summaries
    history: list[dict] = field(default_factory=list)
    experiment: str | None = None
    bundle_size_bytes: int | None = None
    # finished, or what stopped it: failed, interrupted, killed, running, incomplete (a folder's status.json,
    # training.status; MLflow's run status). A run that did not finish shows the figures of where it stopped.
    status: str = FINISHED


@dataclass
class Leaderboard:
    columns: list[str]
    rows: list[dict[str, Any]]
    metric: str
    split: str | None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def load_run(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise CompareError(f"{run_dir} is not a run folder: no config.yaml inside")
    try:
        cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CompareError(f"{cfg_file}: not a readable run config ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise CompareError(f"{cfg_file}: expected a mapping, got {type(cfg).__name__}")
    metrics = {}
    if (run_dir / "metrics.json").is_file():
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            metrics = None
        if not isinstance(metrics, dict):  # a run killed while writing it (before atomic writes), or edited by hand
            logger.warning("skipping unreadable %s (expected a JSON object); the run is listed without metrics",
                           run_dir / "metrics.json")
            metrics = {}
    evaluations = []
    for f in sorted(run_dir.glob("eval/*/evaluation.json")):
        try:
            ev = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("skipping unreadable %s", f)
            continue
        if not (isinstance(ev, dict) and isinstance(ev.get("split"), str) and isinstance(ev.get("metrics"), dict)):
            logger.warning("skipping %s: not an evaluation summary (expected a JSON object with 'split' and "
                           "'metrics', as chatforge evaluate writes)", f)
            continue
        evaluations.append(ev)
    bundle = run_dir / "bundle"
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) if bundle.is_dir() else None
    model = cfg.get("model", {})
    return RunRecord(
        run=str(run_dir), name=cfg.get("name", run_dir.name), family=model.get("family", "?"),
        task=model.get("task", "?"), params=_flatten(cfg), metrics=metrics, evaluations=evaluations,
        history=metrics.get("history", []) or [],
        experiment=(cfg.get("tracking") or {}).get("experiment") or cfg.get("name"), bundle_size_bytes=size,
        status=read_status(run_dir),
    )


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Run folders directly under ``runs_dir`` (those with a config.yaml), sorted by name. Hidden folders are
    skipped: ``.NAME.tmp-*`` is a bundle or conversion being written (or left by a killed writer), and holds a
    config.yaml too."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise CompareError(f"runs folder not found: {runs_dir}")
    return sorted(p for p in runs_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "config.yaml").is_file())


def parse_tags(tags: Sequence[str]) -> dict[str, str]:
    out = {}
    for t in tags:
        if "=" not in t:
            raise CompareError(f"--tag {t!r} must look like key=value, e.g. model.family=linear")
        k, v = t.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _matches(rec: RunRecord, experiment: str | None, tags: dict[str, str]) -> bool:
    if experiment is not None and experiment not in (rec.experiment, rec.name):
        return False
    fields = {**{k: str(v) for k, v in rec.params.items()}, "family": rec.family, "task": rec.task, "name": rec.name}
    return all(fields.get(k) == v for k, v in tags.items())


def collect_runs(run_dirs: Sequence[str | Path] = (), runs_dir: str | Path | None = None,
                 experiment: str | None = None, tags: dict[str, str] | None = None) -> list[RunRecord]:
    """Load the given run folders (or every run under ``runs_dir``) and keep those matching the filters."""
    if run_dirs:  # named by the user: each must load
        records = [load_run(d) for d in run_dirs]
    else:  # every run of a folder: one broken run is skipped with a warning, not the whole leaderboard
        records = []
        for d in find_runs(runs_dir or "runs"):
            try:
                records.append(load_run(d))
            except CompareError as e:
                logger.warning("skipping %s: %s", d, e)
    return [r for r in records if _matches(r, experiment, tags or {})]


def collect_mlflow(tracking_uri: str, experiment: str | None = None, tags: dict[str, str] | None = None,
                   max_runs: int = 1000) -> list[RunRecord]:
    """Runs from an MLflow store: params, ``final_*`` metrics and tags (no evaluation reports)."""
    # lazy: importing mlflow takes seconds; only tracked runs need it
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):  # reading must not create an empty store at a mistyped path
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise CompareError(f"no MLflow store at {db} (--tracking-uri {tracking_uri}); training writes "
                               f"sqlite:///runs/mlflow.db unless tracking.tracking_uri says otherwise")
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if experiment is not None:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise CompareError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
            ids = [exp.experiment_id]
        else:
            ids = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(ids, max_results=max_runs)
    except (MlflowException, OSError) as e:  # a server that does not answer (requests' errors are OSErrors)
        raise CompareError(f"cannot read MLflow runs from {tracking_uri}: {str(e).splitlines()[0][:300]}") from None
    out = []
    for run in found:
        params = dict(run.data.params)
        metrics = {k.removeprefix("final_"): v for k, v in run.data.metrics.items()}
        # MLflow's FINISHED / FAILED / KILLED (a prune or Ctrl-C) / RUNNING / SCHEDULED. A run killed by a signal
        # that let no code run stays RUNNING: when the process that trains it (tags chatforge.host/pid) was of this
        # host and is gone, it reads killed, as a run folder's status does. A run that did not finish logged no
        # final_* metrics, so its figures are the last per-epoch values.
        status = str(run.info.status or "unknown").lower()
        if status == "running" and _trainer_gone(run.data.tags):
            status = KILLED
        rec = RunRecord(run=run.info.run_name or run.info.run_id, name=params.get("name", run.info.run_id),
                        family=run.data.tags.get("family", params.get("model.family", "?")),
                        task=run.data.tags.get("task", params.get("model.task", "?")), params=params,
                        metrics=metrics, experiment=experiment, status=status)
        if all(run.data.tags.get(k) == v or params.get(k) == v for k, v in (tags or {}).items()):
            out.append(rec)
    return out


def _trainer_gone(tags: dict[str, str]) -> bool:
    pid = tags.get("chatforge.pid", "")
    return pid.isdigit() and process_gone(tags.get("chatforge.host"), int(pid))


def _differing_params(records: Sequence[RunRecord]) -> list[str]:
    keys = sorted({k for r in records for k in r.params})
    out = []
    for k in keys:
        if any(k == p or k.startswith(p) for p in _IGNORED_PARAMS):
            continue
        values = {json.dumps(r.params.get(k), sort_keys=True, default=str) for r in records}
        if len(values) > 1:
            out.append(k)
    return out


def board_split(rec: RunRecord, ev: dict) -> str:
    """The split an evaluation stands for on a leaderboard: its split name on the run's own training data, and
    "SPLIT of FILE" on any other file, so evaluations of different data are never ranked as one split."""
    split, data, train = ev.get("split"), ev.get("data"), rec.params.get("data.path")
    train_name = sample_corpus_path().name if train == "sample" else Path(str(train)).name  # as training reads it
    if not data or not isinstance(train, str) or Path(data).name == train_name:
        return split
    return f"{split} of {Path(data).name}"


def _metrics_prefix(rec: RunRecord, split: str | None) -> str | None:
    """The metrics.json prefix (``valid``, ``test``, ``dev``) holding a run's training-time figures on the
    leaderboard's ``split``, or None when the run has no such figures: a row never shows another split's."""
    if split is None or split in ("valid", "test", "dev"):
        return split or "valid"
    if "data.split" not in rec.params:  # a config that does not say how it split: its validation figures
        return "valid"
    keys = rec.params.get("data.valid_keys")
    if rec.params.get("data.split") == "predefined" and isinstance(keys, list) and split == "+".join(map(str, keys)):
        return "valid"
    return None


def build_leaderboard(records: Sequence[RunRecord], metric: str = "in_scope_accuracy",
                      split: str | None = None, max_params: int = 8) -> Leaderboard:
    """One row per run, sorted by ``metric`` (best first; runs without it last)."""
    if not records:
        raise CompareError("no runs to compare (check the folders, --experiment and --tag filters)")
    if split is None:
        # The split most runs were evaluated on, among evaluations that report the metric when some do; dev has
        # its own columns, so another split when there is one; ties go to a run's own data, then by name.
        evals = [(r, e) for r in records for e in r.evaluations]
        evals = [(r, e) for r, e in evals if (e.get("metrics") or {}).get(metric) is not None] or evals
        counts = Counter(board_split(r, e) for r, e in evals if board_split(r, e) != "dev") or Counter(
            board_split(r, e) for r, e in evals)
        split = min(counts, key=lambda k: (-counts[k], " of " in k, k)) if counts else None
    rows = []
    for r in records:
        evals = [e for e in r.evaluations if board_split(r, e) == split]
        ev = max(evals, key=lambda e: e.get("created", "")) if evals else None
        row: dict[str, Any] = {"run": Path(r.run).name, "family": r.family, "task": r.task, "status": r.status}
        if ev is not None:
            row["source"] = f"eval:{split}"
            cf = ev["metrics"].get("cross_fitted") or {}
            row.update({m: cf.get(m.removeprefix(CROSS_FITTED)) if m.startswith(CROSS_FITTED) else ev["metrics"].get(m)
                        for m in METRICS})
            row["latency_ms"] = ev.get("latency_ms_per_example")
            row["n"] = ev.get("n")
        else:
            row["source"] = "metrics.json"
            prefix = _metrics_prefix(r, split)
            for m in METRICS:
                row[m] = None if prefix is None else r.metrics.get(
                    f"{prefix}_{m}", r.metrics.get(m) if prefix == "valid" else None)
            if r.task in TOKEN_ACCURACY_TASKS:  # their training-time accuracy counts next tokens, not examples
                row["accuracy"] = None
            row["latency_ms"] = None
            row["n"] = None if prefix is None else r.metrics.get(f"{prefix}_examples")
        dev_evals = [e for e in r.evaluations if board_split(r, e) == "dev"]
        dev = max(dev_evals, key=lambda e: e.get("created", ""))["metrics"] if dev_evals else None
        for m in DEV_METRICS:
            row[m] = dev.get(m.removeprefix("dev_")) if dev is not None else r.metrics.get(m)
        row["valid_loss"] = r.metrics.get("best_valid_loss")
        row["train_seconds"] = r.metrics.get("train_seconds")
        row["num_parameters"] = r.metrics.get("num_parameters")
        size = ev.get("bundle_size_bytes") if ev else r.bundle_size_bytes
        row["bundle_mb"] = None if size is None else round(size / 1e6, 3)
        rows.append((r, row))
    params = _differing_params([r for r, _ in rows])[:max_params]
    for r, row in rows:
        for p in params:
            row[p] = r.params.get(p)
    sign = 1 if metric in LOWER_IS_BETTER else -1
    # Runs that did not finish go after every finished one, whatever their figures: a half-trained model is not
    # ranked against finished ones.
    rows.sort(key=lambda rr: (rr[1]["status"] != FINISHED, rr[1].get(metric) is None,
                              sign * (rr[1].get(metric) or 0), rr[1]["run"]))
    present = [m for m in (*METRICS, *DEV_METRICS) if any(row.get(m) is not None for _, row in rows)]
    if metric not in present and metric not in ("valid_loss", "train_seconds", "latency_ms", "bundle_mb"):
        raise CompareError(f"--metric {metric!r} is not reported by any run; available: {', '.join(present)}")
    columns = (["run", "family", "task", "status", "source", "n"] + present +
               ["valid_loss", "train_seconds", "latency_ms", "bundle_mb", "num_parameters"] + params)
    return Leaderboard(columns=columns, rows=[row for _, row in rows], metric=metric, split=split)


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return v


def unfinished_runs(lb: Leaderboard) -> str | None:
    """The runs that did not finish, each with its status, and where the board puts them: what follows "did not
    finish:" under the table (Markdown and the terminal alike); None when every run finished."""
    names = [f"{row['run']} ({row['status']})" for row in lb.rows if row["status"] != FINISHED]
    if not names:
        return None
    return (f"{', '.join(names)}; listed after the finished runs, with the figures of where training stopped "
            f"(or none)")


def to_markdown(lb: Leaderboard) -> str:
    head = f"Leaderboard by `{lb.metric}`" + (f" on split `{lb.split}`" if lb.split else "")
    unfinished = unfinished_runs(lb)
    foot = "" if unfinished is None else "\n" + md_text(f"Did not finish: {unfinished}.") + "\n"
    return (head + "\n\n" + _md_table(lb.columns, [[_cell(row.get(c)) for c in lb.columns] for row in lb.rows])
            + "\n" + foot)


def to_csv(lb: Leaderboard) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(lb.columns)
    for row in lb.rows:
        w.writerow(["" if row.get(c) is None else _cell(row.get(c)) for c in lb.columns])
    return buf.getvalue()


def write_markdown(lb: Leaderboard, path: str | Path) -> Path:
    return atomic_write_text(path, to_markdown(lb))


def write_csv(lb: Leaderboard, path: str | Path) -> Path:
    return atomic_write_text(path, to_csv(lb))


def learning_curves_png(records: Sequence[RunRecord], keys: Sequence[str] = ("valid_loss", "valid_accuracy")) -> bytes:
    """Per-epoch curves of every run with a history (estimators have none), one panel per key."""
    # lazy: matplotlib takes seconds to import; only figures need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.0 * len(keys), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        plotted = 0
        for r in records:
            pts = [(h["epoch"], h[key]) for h in r.history if key in h and h[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=Path(r.run).name)
                plotted += 1
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no ticks between epochs
        ax.set_ylabel(key)
        ax.set_title(key if plotted else f"{key}: no per-epoch history in these runs", fontsize=9)
        if plotted:
            ax.legend(prop={"size": 7, "family": text_fonts()})  # run names may be Korean
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def write_learning_curves(records: Sequence[RunRecord], path: str | Path) -> Path:
    return atomic_write_bytes(path, learning_curves_png(records))
