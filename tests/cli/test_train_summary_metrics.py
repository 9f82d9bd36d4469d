"""`chatforge train` ends with a table of the run's figures for every kind of model. Before, the table listed a
fixed set of classifier keys, so a selection run (the retrieval bot) showed only its example count and seconds:
none of the R@1, MRR or chrF figures its metrics.json holds for valid and test."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from chatforge.cli import app

CONFIG = """name: tiny-tfidf
seed: 0
data: {path: sample, valid_fraction: 0.1, test_fraction: 0.1}
model: {family: retrieval, task: selection, encoder: tfidf}
tracking: {enabled: false}
"""


def test_selection_run_shows_its_figures(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG)
    r = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run"),
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("valid_r1_of_10", "test_r1_of_10", "valid_chrf"):
        assert key in metrics and key in r.output, key
    assert f"{metrics['test_r1_of_10']:.4f}" in r.output
