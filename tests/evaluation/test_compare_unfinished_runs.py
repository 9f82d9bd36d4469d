"""`chatforge compare` marks runs that did not finish and ranks them after the finished ones.

Found by a review: a run killed, failed or still running showed on the leaderboard like a finished one (from MLflow
with the last per-epoch figures it logged; from a runs/ folder with no sign it stopped half-way). The run driver now
writes `status.json` (running, then finished / failed / interrupted; a `running` whose process is gone reads as
killed, which is what SIGKILL leaves), compare shows a `status` column (MLflow's run status for tracked runs) and
lists the runs that did not finish after the finished ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.evaluation.test_compare import make_run
from tests.process_helpers import dead_pid
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.evaluation.compare import build_leaderboard, collect_mlflow, collect_runs, to_markdown
from chatforge.fileio import process_tag
from chatforge.training import status as run_status
from chatforge.training.run import run_experiment
from chatforge.training.status import read_status, write_status
from chatforge.training.trainer import Callback


def _status_file(run, status: str, pid: int) -> None:
    (run / "status.json").write_text(json.dumps({"status": status, "host": process_tag()["host"], "pid": pid}))


@pytest.fixture
def runs(tmp_path):
    make_run(tmp_path, "a-done", "linear", 0.90, 0.40, 0.1)
    killed = make_run(tmp_path, "b-killed", "transformer", 0.99, 0.50, 0.001)  # the best figures, half-trained
    _status_file(killed, "running", dead_pid())  # what a SIGKILLed training leaves
    live = make_run(tmp_path, "c-running", "transformer", 0.98, 0.50, 0.002)
    _status_file(live, "running", os.getpid())
    failed = make_run(tmp_path, "d-failed", "transformer", 0.97, 0.50, 0.003)
    _status_file(failed, "failed", os.getpid())
    old = make_run(tmp_path, "e-old-killed", "transformer", None, 0.5, 0.004)  # killed before status.json existed
    (old / "metrics.json").unlink()
    return tmp_path


def test_leaderboard_marks_unfinished_runs_and_ranks_them_last(runs):
    lb = build_leaderboard(collect_runs(runs_dir=runs), metric="in_scope_accuracy")
    assert "status" in lb.columns
    assert [(r["run"], r["status"]) for r in lb.rows] == [
        ("a-done", "finished"), ("b-killed", "killed"), ("c-running", "running"), ("d-failed", "failed"),
        ("e-old-killed", "incomplete")]
    md = to_markdown(lb)
    assert "| a-done | linear | classification | finished |" in md
    assert "Did not finish: b-killed (killed), c-running (running), d-failed (failed), e-old-killed (incomplete)" in md


def test_cli_names_the_runs_that_did_not_finish(runs):
    r = CliRunner().invoke(app, ["compare", "--runs-dir", str(runs)])
    assert r.exit_code == 0, r.output
    assert "did not finish: b-killed (killed)" in " ".join(r.output.split())


class _StopAt(Callback):
    def __init__(self, error: BaseException):
        self.error = error

    def on_step_end(self, trainer, step, logs):
        raise self.error


@pytest.mark.parametrize(("error", "status"), [(KeyboardInterrupt(), "interrupted"),
                                               (RuntimeError("CUDA out of memory"), "failed")])
def test_training_records_how_it_ended(tmp_path, error, status):
    cfg = validate_config({
        "name": "st", "data": {"path": "sample", "format": "chatbot_csv"}, "tokenizer": {"vocab_size": 600},
        "model": {"family": "transformer", "task": "classification", "d_model": 16, "n_heads": 2,
                  "num_encoder_layers": 1, "d_ff": 32},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 16}, "tracking": {"enabled": False}})
    with pytest.raises(type(error)):
        run_experiment(cfg, run_dir=tmp_path / "run", callbacks=[_StopAt(error)])
    assert read_status(tmp_path / "run") == status
    if status == "failed":
        assert "CUDA out of memory" in json.loads((tmp_path / "run" / "status.json").read_text())["error"]
    run_experiment(cfg, run_dir=tmp_path / "run")
    assert read_status(tmp_path / "run") == "finished"


def test_status_is_one_of_the_written_values(tmp_path):
    with pytest.raises(ValueError, match="run status 'done'; allowed: finished, running, failed, interrupted"):
        write_status(tmp_path, "done")


def test_mlflow_runs_carry_their_run_status(tmp_path):
    pytest.importorskip("mlflow", reason="the MLflow store is read through mlflow (chatforge[track])")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("st")
    for name, status, acc in (("done", "FINISHED", 0.8), ("crashed", "FAILED", 0.95), ("alive", None, 0.9)):
        run = client.create_run(exp, run_name=name)
        client.log_metric(run.info.run_id, "final_in_scope_accuracy" if status == "FINISHED" else "in_scope_accuracy",
                          acc)
        if status:
            client.set_terminated(run.info.run_id, status)
    lb = build_leaderboard(collect_mlflow(uri, "st"), metric="in_scope_accuracy")
    # the crashed run's last figure is the best: it still comes after the finished run
    assert [(r["run"], r["status"]) for r in lb.rows] == [("done", "finished"), ("crashed", "failed"),
                                                         ("alive", "running")]


def test_an_mlflow_run_whose_training_process_is_gone_reads_killed(tmp_path):
    """SIGKILL leaves an MLflow run RUNNING for good; training tags it with its host and pid, and compare reads it as
    killed once that process is gone. Fails on the old code (it showed `running`)."""
    pytest.importorskip("mlflow", reason="the MLflow store is read through mlflow (chatforge[track])")
    from mlflow.tracking import MlflowClient

    from chatforge.fileio import process_tag
    from chatforge.training.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MLflowTracker(uri, "k")
    alive = tracker.start("alive", {})
    assert MlflowClient(tracking_uri=uri).get_run(alive).data.tags["chatforge.pid"] == str(process_tag()["pid"])
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("k").experiment_id
    gone = client.create_run(exp, run_name="gone", tags={"chatforge.host": str(process_tag()["host"]),
                                                          "chatforge.pid": str(dead_pid())})
    other = client.create_run(exp, run_name="elsewhere", tags={"chatforge.host": "another-host", "chatforge.pid": "1"})
    for run_id in (alive, gone.info.run_id, other.info.run_id):
        client.log_metric(run_id, "in_scope_accuracy", 0.5)
    got = {r.run: r.status for r in collect_mlflow(uri, "k")}
    assert got == {"alive": "running", "gone": "killed", "elsewhere": "running"}


def test_the_readme_names_every_status_a_run_folder_reads():
    """README's paragraph on the status column left out `finished` and what makes a run `interrupted` (a prune) or
    `killed` (only on the host that ran it)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = readme.index("Its `status` column")
    paragraph = readme[start:readme.index("\n\n", start)]
    names = (run_status.FINISHED, run_status.RUNNING, run_status.FAILED, run_status.INTERRUPTED, run_status.KILLED,
             run_status.INCOMPLETE)
    assert [n for n in names if f"`{n}`" not in paragraph] == []
    assert "prune" in paragraph and "host" in paragraph
    # ... and the paragraph that lists what a run folder holds names the file
    start = readme.index("The run folder\n")
    assert f"`{run_status.STATUS_FILE}`" in readme[start:readme.index("**", start)]
