"""`chatforge compare`: leaderboard over run folders (hand-made runs: no training needed)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.evaluation.compare import (
    CompareError,
    build_leaderboard,
    collect_runs,
    learning_curves_png,
    to_csv,
    to_markdown,
)


def make_run(root: Path, name: str, family: str, in_scope: float | None, recall: float, lr: float,
             split: str = "val+oos_val", history: bool = True) -> Path:
    run = root / name
    (run / "bundle").mkdir(parents=True)
    (run / "bundle" / "weights.bin").write_bytes(b"x" * 2000)
    cfg = {"name": name, "model": {"family": family, "task": "classification"}, "train": {"lr": lr},
           "tracking": {"experiment": "clinc"}, "output": {"dir": str(root)}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    hist = [{"epoch": 1, "valid_loss": 2.0, "valid_accuracy": 0.5}, {"epoch": 2, "valid_loss": 1.0,
                                                                    "valid_accuracy": 0.8}] if history else []
    (run / "metrics.json").write_text(json.dumps({"train_seconds": 12.5, "history": hist, "best_valid_loss": 1.0,
                                                  "valid_in_scope_accuracy": 0.11}))
    if in_scope is not None:
        ev = run / "eval" / f"data-{split}"
        ev.mkdir(parents=True)
        (ev / "evaluation.json").write_text(json.dumps({
            "split": split, "n": 3100, "latency_ms_per_example": 0.5, "bundle_size_bytes": 2000,
            "created": "2026-01-01T00:00:00+00:00",
            "metrics": {"in_scope_accuracy": in_scope, "oos_recall": recall, "accuracy": in_scope}}))
    return run


@pytest.fixture
def runs(tmp_path):
    make_run(tmp_path, "a-linear", "linear", 0.92, 0.40, 0.1, history=False)
    make_run(tmp_path, "b-transformer", "transformer", 0.95, 0.30, 0.001)
    make_run(tmp_path, "c-noeval", "xgboost", None, 0.0, 0.1)
    return tmp_path


def test_leaderboard_sorted_side_by_side(runs):
    lb = build_leaderboard(collect_runs(runs_dir=runs), metric="in_scope_accuracy")
    assert lb.split == "val+oos_val"
    assert [r["run"] for r in lb.rows] == ["b-transformer", "a-linear", "c-noeval"]
    top = lb.rows[0]
    assert top["in_scope_accuracy"] == 0.95 and top["latency_ms"] == 0.5 and top["bundle_mb"] == 0.002
    assert top["train_seconds"] == 12.5 and top["source"] == "eval:val+oos_val"
    # a run without that evaluation falls back to its training-time metrics, and says so
    assert lb.rows[2]["source"] == "metrics.json" and lb.rows[2]["in_scope_accuracy"] == 0.11
    assert "train.lr" in lb.columns and "model.family" in lb.columns and "output.dir" not in lb.columns
    lb2 = build_leaderboard(collect_runs(runs_dir=runs), metric="oos_recall")
    assert lb2.rows[0]["run"] == "a-linear"


def test_markdown_and_csv(runs):
    lb = build_leaderboard(collect_runs(runs_dir=runs))
    md = to_markdown(lb)
    assert md.splitlines()[2].startswith("| run | family |") and "| b-transformer | transformer |" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(lb))))
    assert rows[0]["run"] == "b-transformer" and float(rows[0]["in_scope_accuracy"]) == 0.95


def test_filters(runs):
    assert [r.name for r in collect_runs(runs_dir=runs, tags={"family": "linear"})] == ["a-linear"]
    assert len(collect_runs(runs_dir=runs, tags={"train.lr": "0.1"})) == 2
    assert len(collect_runs(runs_dir=runs, experiment="clinc")) == 3
    with pytest.raises(CompareError, match="no runs"):
        build_leaderboard(collect_runs(runs_dir=runs, experiment="other"))
    with pytest.raises(CompareError, match="available: in_scope_accuracy"):
        build_leaderboard(collect_runs(runs_dir=runs), metric="bleu")
    with pytest.raises(CompareError, match="not found"):
        collect_runs(runs_dir=runs / "nope")


def test_learning_curves_png(runs):
    png = learning_curves_png(collect_runs(runs_dir=runs))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_compare_writes_outputs(runs, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["compare", "--runs-dir", str(runs), "--md", str(out / "lb.md"),
                                 "--csv", str(out / "lb.csv"), "--plot", str(out / "curves.png")])
    assert r.exit_code == 0, r.output
    assert "leaderboard by in_scope_accuracy" in r.output
    assert (out / "lb.md").read_text().count("\n| ") == 4  # header + 3 runs
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(app, ["compare", "--runs-dir", str(runs), "--tag", "oops"])
    assert r.exit_code == 2 and "key=value" in r.output


def test_cross_fitted_figures_are_columns_and_can_rank(runs):
    ev = runs / "a-linear" / "eval" / "data-val+oos_val" / "evaluation.json"
    doc = json.loads(ev.read_text())
    doc["metrics"]["cross_fitted"] = {"in_scope_accuracy": 0.935, "oos_recall": 0.577, "folds": 10, "repeats": 10}
    ev.write_text(json.dumps(doc))
    lb = build_leaderboard(collect_runs(runs_dir=runs), metric="cross_fitted_in_scope_accuracy")
    assert [r["run"] for r in lb.rows][:2] == ["a-linear", "b-transformer"]  # the run without one ranks last
    assert lb.rows[0]["cross_fitted_oos_recall"] == 0.577 and lb.rows[1]["cross_fitted_oos_recall"] is None
    assert "cross_fitted_in_scope_accuracy" in lb.columns
    plain = build_leaderboard(collect_runs(runs_dir=runs), metric="in_scope_accuracy")
    assert plain.rows[0]["run"] == "b-transformer"


@pytest.mark.parametrize("metrics", ['{"bro', "[1, 2]", "null"])
def test_one_broken_run_does_not_take_the_leaderboard_down(runs, metrics, caplog):
    (runs / "c-noeval" / "metrics.json").write_text(metrics)  # a run edited by hand or cut off mid-write
    make_run(runs, "d-badconfig", "linear", 0.9, 0.3, 0.1)
    (runs / "d-badconfig" / "config.yaml").write_text("- a list\n- not a run config\n")
    records = collect_runs(runs_dir=runs)
    assert [r.name for r in records] == ["a-linear", "b-transformer", "c-noeval"]
    assert next(r for r in records if r.name == "c-noeval").metrics == {}
    assert any("c-noeval" in r.getMessage() and "metrics.json" in r.getMessage() for r in caplog.records)
    assert any("d-badconfig" in r.getMessage() for r in caplog.records)
    with pytest.raises(CompareError, match="expected a mapping"):  # named by the user: refused, not skipped
        collect_runs(run_dirs=[runs / "d-badconfig"])
