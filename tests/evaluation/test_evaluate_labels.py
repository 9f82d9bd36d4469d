"""`chatforge evaluate --data` with examples whose labels the model does not know: refused when none is known (a
report of accuracy 0 for a mistaken file is no result), counted and warned about when some are."""

from __future__ import annotations

import json

import pytest
from tests.test_oos import intent_cfg
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.evaluation.evaluate import EvaluationError, evaluate_bundle
from chatforge.training.run import run_experiment


@pytest.fixture(scope="module")
def intent_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("intent")
    return run_experiment(validate_config(intent_cfg(tmp)), run_dir=tmp / "run")


def _clinc(path, rows):
    path.write_text(json.dumps({"val": [list(r) for r in rows]}), encoding="utf-8")
    return path


def test_data_of_another_label_set_is_refused_in_one_line(intent_run, tmp_path):
    data = _clinc(tmp_path / "other.json", [("book a table", "restaurant"), ("cancel it", "cancel")])
    with pytest.raises(EvaluationError, match=r"none of the 2 examples has a label this model predicts.*cancel, "
                                              r"restaurant"):
        evaluate_bundle(intent_run.bundle_dir, data, clinc_keys=["val"], out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(app, ["evaluate", str(intent_run.bundle_dir), "--data", str(data), "--clinc-keys", "val",
                                 "--out", str(tmp_path / "cli")])
    assert r.exit_code == 2 and "none of the 2 examples" in r.output and "Traceback" not in r.output


def test_some_unknown_labels_are_counted(intent_run, tmp_path):
    data = _clinc(tmp_path / "mixed.json", [("will it rain today", "weather"), ("book a table", "restaurant")])
    res = evaluate_bundle(intent_run.bundle_dir, data, clinc_keys=["val"], out_dir=tmp_path / "out")
    assert res.summary["metrics"]["unknown_label_examples"] == 1
