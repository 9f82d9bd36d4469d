"""`chatforge generate` with a retrieval (selection) bundle: it answers with the pool's chosen reply (it was an
AttributeError traceback: the command only knew generators and classifiers), and bad decoding options are refused
before any bundle loads."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.inference import load_model
from chatforge.training.run import run_experiment

DATA = {"path": "sample", "format": "chatbot_csv", "valid_fraction": 0.1, "test_fraction": 0.1}


@pytest.fixture(scope="module")
def selection_bundle(tmp_path_factory):
    cfg = validate_config({"name": "sel", "seed": 0, "data": DATA, "tracking": {"enabled": False},
                           "model": {"family": "retrieval", "task": "selection", "neighbours": 5}})
    return run_experiment(cfg, run_dir=tmp_path_factory.mktemp("h5-sel") / "run").bundle_dir


def test_a_selection_bundle_answers_with_the_chosen_reply(selection_bundle):
    want, score = load_model(selection_bundle, name="x").select("hello")
    r = CliRunner().invoke(app, ["generate", str(selection_bundle), "hello"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"bot: {want} ({score:.3f})" in " ".join(r.output.split())


def test_bad_decoding_options_are_refused_before_the_bundle_loads(tmp_path):
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "no-such-bundle"), "hi", "--top-k", "-1"])
    assert r.exit_code == 2
    assert "top_k=-1 is out of range" in r.output
