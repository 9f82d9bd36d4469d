"""`chatforge train` into a run folder that cannot be created (under a file, a name longer than the filesystem
takes, no permission) fails in one line naming the folder, exit 2. Before, it ended in a traceback
(NotADirectoryError, OSError: File name too long)."""

from __future__ import annotations

from typer.testing import CliRunner

from chatforge.cli import app

CONFIG = """name: {name}
data: {{path: sample}}
model: {{family: linear, task: classification}}
tracking: {{enabled: false}}
output: {{dir: {out}}}
"""


def test_run_folder_under_a_file(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG.format(name="t", out=tmp_path / "runs"))
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "afile" / "run"),
                                 "--no-progress"])
    assert r.exit_code == 2, r.output
    assert "cannot create the run folder" in r.output and "Traceback" not in r.output


def test_name_too_long_for_the_filesystem(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG.format(name="a" * 300, out=tmp_path / "runs"))
    r = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--no-progress"])
    assert r.exit_code == 2, r.output
    assert "cannot create the run folder" in r.output and "Traceback" not in r.output
