"""`evaluate --out` inside the bundle folder is refused: the report's files would travel with the bundle that servers
load and `convert` exports (found by a new-user review: `--out runs/X/bundle` wrote report.md, PNGs and JSON there)."""

from __future__ import annotations

import pytest
from tests.evaluation.test_evaluate_heldout_file import _rows, _write, hashed_run  # noqa: F401 (fixture)
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.evaluation.evaluate import EvaluationError, evaluate_bundle


@pytest.mark.parametrize("where", ["", "eval"])
def test_a_report_folder_inside_the_bundle_is_refused(hashed_run, tmp_path, where):  # noqa: F811
    run, _ = hashed_run
    held = _write(tmp_path / "held.csv", _rows(3, "now"))
    before = sorted(p.name for p in run.bundle_dir.rglob("*"))
    out = run.bundle_dir / where if where else run.bundle_dir
    with pytest.raises(EvaluationError, match="is inside the bundle .* read-only input; write the report elsewhere"):
        evaluate_bundle(run.bundle_dir, held, out_dir=out, track=False)
    r = CliRunner().invoke(app, ["evaluate", str(run.bundle_dir), "--data", str(held), "--out", str(out)])
    assert r.exit_code == 2 and "read-only input" in r.output, r.output
    assert sorted(p.name for p in run.bundle_dir.rglob("*")) == before  # nothing written into it
