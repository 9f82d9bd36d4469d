"""`chatforge convert` replaces its output folder whole: it must never take the source, or a folder of other files,
with it. No HF install needed: every refusal comes before the family's converter is imported."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.interop import ConversionError, from_hf, to_hf


def _run_with_bundle(tmp_path):
    run = tmp_path / "run"
    (run / "bundle").mkdir(parents=True)
    (run / "bundle" / "metadata.json").write_text(json.dumps({"family": "transformer"}))
    (run / "metrics.json").write_text("{}")
    return run


@pytest.mark.parametrize("out", ["run", "run/bundle"])
def test_to_hf_refuses_to_replace_the_run_folder_or_the_bundle_itself(tmp_path, out):
    run = _run_with_bundle(tmp_path)
    with pytest.raises(ConversionError, match="holds the source"):
        to_hf(run / "bundle", tmp_path / out)
    assert (run / "metrics.json").is_file() and (run / "bundle" / "metadata.json").is_file()


def test_to_hf_refuses_a_folder_of_other_files_and_says_so_in_one_line(tmp_path):
    run = _run_with_bundle(tmp_path)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    r = CliRunner().invoke(app, ["convert", "to-hf", str(run / "bundle"), str(other)])
    assert r.exit_code == 2
    assert "already holds other files (notes.txt)" in r.output and "Traceback" not in r.output
    assert (other / "notes.txt").read_text() == "keep me"


def test_from_hf_refuses_its_own_source_and_a_run_folder(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="holds the source"):
        from_hf(src, src)
    run = _run_with_bundle(tmp_path)
    with pytest.raises(ConversionError, match="already holds other files"):
        from_hf(src, run)
    assert (run / "metrics.json").is_file()


def test_from_hf_names_an_unreadable_config_json(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("nope")
    with pytest.raises(ConversionError, match=r"config\.json: not a readable JSON file"):
        from_hf(src, tmp_path / "out")
