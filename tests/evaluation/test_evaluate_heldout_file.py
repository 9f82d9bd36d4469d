"""`chatforge evaluate BUNDLE --data HELDOUT` on a file the bundle never trained on scores every row of that file.

Before, a bundle with a random (hashed) split took its config's valid fraction of the held-out file too: 8 of 100
rows were scored, and a file too small for that fraction failed with a message saying the fraction was 0."""

from __future__ import annotations

import csv
import shutil

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.evaluation.evaluate import EvaluationError, evaluate_bundle
from chatforge.training.run import run_experiment

WORDS = {"weather": ["rain", "sunny", "cloudy", "forecast"], "music": ["song", "play", "album", "guitar"],
         "food": ["pizza", "hungry", "dinner", "lunch"]}


def _write(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _rows(n_per_label: int, suffix: str) -> list[tuple[str, str]]:
    return [(f"{words[i % 4]} {words[(i + 1) % 4]} {suffix} {i}", label)
            for label, words in WORDS.items() for i in range(n_per_label)]


@pytest.fixture(scope="module")
def hashed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hashed")
    data = _write(tmp / "train.csv", _rows(20, "please"))
    tree = {"name": "hashed", "seed": 0,
            "data": {"path": str(data), "valid_fraction": 0.2, "test_fraction": 0.2, "stratify": True},
            "model": {"family": "linear", "task": "classification", "C": 10.0, "max_iter": 200},
            "output": {"dir": str(tmp / "runs")}, "tracking": {"enabled": False}}
    return run_experiment(validate_config(tree), run_dir=tmp / "run"), data


def test_a_heldout_file_is_scored_whole(hashed_run, tmp_path):
    run, _ = hashed_run
    held = _write(tmp_path / "held.csv", _rows(7, "now"))  # 21 rows never seen in training
    res = evaluate_bundle(run.bundle_dir, held, out_dir=tmp_path / "out", track=False)
    assert res.summary["n"] == 21 and res.summary["split"] == "all"
    # a file too small for the config's valid fraction is still scored whole, not refused
    tiny = _write(tmp_path / "tiny.csv", [("rain please", "weather"), ("play a song", "music")])
    assert evaluate_bundle(run.bundle_dir, tiny, out_dir=tmp_path / "t", track=False).summary["n"] == 2
    r = CliRunner().invoke(app, ["evaluate", str(run.bundle_dir), "--data", str(held), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "21 examples" in r.output


def test_the_training_file_still_gives_its_valid_split(hashed_run, tmp_path):
    run, data = hashed_run
    n_valid = run.metrics["valid_examples"]
    assert evaluate_bundle(run.bundle_dir, track=False, out_dir=tmp_path / "a").summary["n"] == n_valid
    copy = shutil.copy(data, tmp_path / "copy.csv")  # the same bytes elsewhere: still the training data
    res = evaluate_bundle(run.bundle_dir, copy, out_dir=tmp_path / "b", track=False)
    assert res.summary["n"] == n_valid and res.summary["split"] == "valid"
    # an explicit --split still splits any file as the training data was split
    held = _write(tmp_path / "held.csv", _rows(7, "now"))
    assert evaluate_bundle(run.bundle_dir, held, split="valid", out_dir=tmp_path / "v",
                           track=False).summary["n"] < 21


def test_an_empty_split_names_the_real_fraction(hashed_run, tmp_path):
    run, _ = hashed_run
    tiny = _write(tmp_path / "tiny.csv", [("rain please", "weather")])
    with pytest.raises(EvaluationError, match=r"valid_fraction 0\.2.*--split all") as e:
        evaluate_bundle(run.bundle_dir, tiny, split="valid", out_dir=tmp_path / "t", track=False)
    assert "is 0" not in str(e.value)
