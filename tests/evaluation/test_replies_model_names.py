"""`chatforge replies`: a model named like one of the reply table's own columns ("question", "reference", and
"hybrid" beside --hybrid) overwrote that column in replies.json/.md/.html (the questions became the model's
replies). Such names are refused before any bundle is read; no training needed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.evaluation.evaluate import EvaluationError
from chatforge.evaluation.replies import reply_table


@pytest.mark.parametrize("name", ["question", "reference", ""])
def test_a_model_named_like_a_table_column_is_refused(tmp_path, name):
    with pytest.raises(EvaluationError, match="not allowed"):
        reply_table({name: str(tmp_path / "b"), "other": str(tmp_path / "c")}, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hybrid_is_refused_as_a_model_name_only_beside_the_hybrid_column(tmp_path):
    with pytest.raises(EvaluationError, match="'hybrid' is not allowed"):
        reply_table({"hybrid": str(tmp_path / "b"), "sel": str(tmp_path / "c")}, hybrid_of=("sel", "hybrid"),
                    out_dir=tmp_path / "out")
    with pytest.raises(Exception) as e:  # without --hybrid the name is free: the next complaint is the bundle
        reply_table({"hybrid": str(tmp_path / "b")}, out_dir=tmp_path / "out")
    assert "not allowed" not in str(e.value)


def test_the_cli_says_so_in_one_line(tmp_path):
    (tmp_path / "b").mkdir()
    r = CliRunner().invoke(app, ["replies", "--model", f"question={tmp_path / 'b'}", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "model name 'question' is not allowed" in r.output
