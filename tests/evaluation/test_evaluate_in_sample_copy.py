"""`chatforge evaluate` says an oos policy's figures are in-sample when the examples are the ones it was fitted
on, whatever file they come in: the upstream CLINC150 ``data_full.json`` holds the same ``val`` lists as the
``data_full_trainval.json`` the configs train on, so `--data data_full.json --clinc-keys val,oos_val` scored the
policy on its own fitting data and said nothing (only the training file's own bytes were recognised)."""

from __future__ import annotations

import json
import logging

import pytest
from tests.test_oos import intent_cfg, write_intent_data

from chatforge.config import validate_config
from chatforge.evaluation.evaluate import evaluate_bundle
from chatforge.training.run import run_experiment


@pytest.fixture(scope="module")
def threshold_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("thr")
    return run_experiment(validate_config(intent_cfg(tmp, oos={"policy": "threshold"})), run_dir=tmp / "run")


def test_fitting_examples_in_another_file_are_flagged(threshold_run, tmp_path, caplog):
    trained = json.loads((threshold_run.run_dir.parent / "intents.json").read_text())
    upstream = dict(trained, test=trained["val"], oos_test=trained["oos_val"])  # the same lists under other keys
    (tmp_path / "data_full.json").write_text(json.dumps(upstream))
    for keys in (["val", "oos_val"], ["test", "oos_test"]):
        with caplog.at_level(logging.WARNING, logger="chatforge.evaluation.evaluate"):
            res = evaluate_bundle(threshold_run.bundle_dir, tmp_path / "data_full.json", clinc_keys=keys,
                                  out_dir=tmp_path / "+".join(keys), track=False)
        assert res.summary["metrics"].get("oos_policy_fitted_on_this_split") is True, keys
        assert "in-sample" in (tmp_path / "+".join(keys) / "evaluation.md").read_text()
    assert any("fitted on" in r.getMessage() for r in caplog.records)


def test_unseen_examples_are_not_flagged(threshold_run, tmp_path):
    fresh = write_intent_data(tmp_path / "fresh.json", seed=7)
    res = evaluate_bundle(threshold_run.bundle_dir, fresh, clinc_keys=["val", "oos_val"], out_dir=tmp_path / "o",
                          track=False)
    assert "oos_policy_fitted_on_this_split" not in res.summary["metrics"]
