"""A classifier bundle without labels.json is an incomplete bundle (one line naming the file), not the builder's
traceback ("task 'classification' needs num_labels >= 1; got None")."""

from __future__ import annotations

import shutil

import pytest
from tests.test_bundle import tiny_cfg
from typer.testing import CliRunner

from chatforge.bundle import BundleError, load_bundle
from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.training.run import run_experiment


def test_classifier_bundle_without_labels_json_is_refused(tmp_path):
    tree = tiny_cfg("classification", tmp_path, max_steps=1)
    tree["tracking"] = {"enabled": False}
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "run")
    broken = tmp_path / "b"
    shutil.copytree(res.bundle_dir, broken)
    (broken / "labels.json").unlink()
    with pytest.raises(BundleError, match="missing labels.json"):
        load_bundle(broken)
    r = CliRunner().invoke(app, ["generate", str(broken), "hi"])
    assert r.exit_code == 2 and "missing labels.json" in r.output and "Traceback" not in r.output


def test_a_run_folder_given_for_its_bundle_is_pointed_to_the_bundle(tmp_path):
    tree = tiny_cfg("classification", tmp_path, max_steps=1)
    tree["tracking"] = {"enabled": False}
    run = tmp_path / "run"
    run_experiment(validate_config(tree), run_dir=run)
    with pytest.raises(BundleError, match=f"looks like a run folder: its bundle is {run / 'bundle'}"):
        load_bundle(run)
    with pytest.raises(BundleError) as info:  # any other incomplete folder gets no such hint
        load_bundle(tmp_path)
    assert "looks like a run folder" not in str(info.value)
