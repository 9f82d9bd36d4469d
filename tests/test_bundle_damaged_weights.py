"""A bundle whose weights.safetensors is cut short (a copy or download interrupted) or belongs to another size of model
failed to load with a safetensors/torch traceback from every command that loads it (generate, evaluate, convert
to-hf, serve). It is now a BundleError naming the file, which the commands print in one line."""

from __future__ import annotations

import shutil

import pytest
import yaml
from tests.test_bundle import tiny_cfg
from typer.testing import CliRunner

from chatforge.bundle import BundleError, load_bundle
from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.training.run import run_experiment


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("h5-weights")
    cfg = tiny_cfg("generation", tmp, max_steps=1)
    cfg["tracking"] = {"enabled": False}
    return run_experiment(validate_config(cfg), run_dir=tmp / "run").bundle_dir


def test_truncated_weights_are_named(bundle, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(bundle, cut)
    data = (cut / "weights.safetensors").read_bytes()
    (cut / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="weights.safetensors is damaged or incomplete"):
        load_bundle(cut)
    r = CliRunner().invoke(app, ["generate", str(cut), "hi"])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "is damaged or incomplete" in " ".join(r.output.split())


def test_weights_of_another_size_are_named(bundle, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["d_ff"] = 48  # the saved weights have 64
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(BundleError, match="does not match the model built from config.yaml"):
        load_bundle(other)
