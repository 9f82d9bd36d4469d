"""`chatforge evaluate`: report folders for classification (with OOS) and generation bundles."""

from __future__ import annotations

import json

import pytest
from tests.test_oos import intent_cfg
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.evaluation.evaluate import EvaluationError, evaluate_bundle
from chatforge.training.run import run_experiment

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def intent_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("intent")
    return run_experiment(validate_config(intent_cfg(tmp)), run_dir=tmp / "run")


def test_classification_report_folder(intent_run):
    res = evaluate_bundle(intent_run.bundle_dir)  # default: the bundle's own data, its valid split
    assert res.out_dir == intent_run.run_dir / "eval" / "intents-val+oos_val"
    names = {p.name for p in res.out_dir.iterdir()}
    assert {"report.json", "report.md", "errors.json", "confusion_matrix.png", "confidence_histogram.png",
            "evaluation.json", "evaluation.md"} <= names
    assert (res.out_dir / "confusion_matrix.png").read_bytes()[:8] == PNG
    s = json.loads((res.out_dir / "evaluation.json").read_text())
    assert s["split"] == "val+oos_val" and s["n"] == 3 * 6 + 6 and s["family"] == "linear"
    m = s["metrics"]
    # the numbers are the served answers': same as the run's own validation metrics
    assert m["in_scope_accuracy"] == pytest.approx(intent_run.metrics["valid_in_scope_accuracy"])
    assert m["oos_recall"] == pytest.approx(intent_run.metrics["valid_oos_recall"])
    assert 0 <= m["macro_f1"] <= 1 and s["latency_ms_per_example"] > 0 and s["bundle_size_bytes"] > 1000
    report = json.loads((res.out_dir / "report.json").read_text())
    assert set(report["per_label"]) == {"weather", "flight", "music", "oos"}


def test_clinc_keys_and_explicit_out(intent_run, tmp_path):
    data = intent_run.run_dir.parent / "intents.json"
    res = evaluate_bundle(intent_run.bundle_dir, data, clinc_keys=["oos_val"], out_dir=tmp_path / "o")
    assert res.summary["split"] == "oos_val" and res.summary["n"] == 6
    assert res.summary["metrics"]["in_scope_accuracy"] is None  # no in-scope examples in oos_val


def test_bad_split_and_missing_data(intent_run, tmp_path):
    with pytest.raises(EvaluationError, match="allowed: valid, test, dev, all"):
        evaluate_bundle(intent_run.bundle_dir, split="train")
    with pytest.raises(EvaluationError, match="no test split"):
        evaluate_bundle(intent_run.bundle_dir, split="test")
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_bundle(intent_run.bundle_dir, tmp_path / "nope.json")


def test_cli_evaluate(intent_run, tmp_path):
    r = CliRunner().invoke(app, ["evaluate", str(intent_run.bundle_dir), "--clinc-keys", "val,oos_val",
                                 "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert "in_scope_accuracy" in r.output and (tmp_path / "cli" / "report.md").is_file()
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not found" in r.output


def test_generation_report(tmp_path):
    tree = {"name": "tiny-gen", "seed": 1, "data": {"path": "sample"},
            "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
            "model": {"family": "transformer", "task": "generation", "d_model": 32, "n_heads": 2, "d_ff": 64,
                      "dropout": 0.0, "num_encoder_layers": 1, "num_decoder_layers": 1},
            "train": {"epochs": 1, "max_steps": 2, "batch_size": 16, "max_source_len": 16, "max_target_len": 8},
            "output": {"dir": str(tmp_path)}, "tracking": {"enabled": False}}
    run = run_experiment(validate_config(tree), run_dir=tmp_path / "gen")
    res = evaluate_bundle(run.bundle_dir, split="test", max_examples=4)
    assert (res.out_dir / "generation_report.json").is_file() and (res.out_dir / "evaluation.md").is_file()
    m = res.summary["metrics"]
    assert m["perplexity"] > 1.0 and 0.0 <= m["bleu"] <= 100.0 and 0.0 <= m["distinct_1"] <= 1.0
    assert res.summary["n"] == 4 and len(res.report["samples"]) == 4
