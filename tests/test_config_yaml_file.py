"""The config file itself: a key given twice, a file that is not UTF-8 and a YAML syntax error are each one line
naming the file (and line), before any work."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import ConfigError, load_config

BASE = "name: t\ndata: {path: sample}\nmodel: {family: linear, task: classification}\n"


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(BASE + "seed: 0\nseed: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:5:1: not valid YAML: key 'seed' is given twice \(first on line 4\)"):
        load_config(f)
    f.write_text("name: t\ndata: {path: sample, path: other.csv}\nmodel: {family: linear, task: classification}\n")
    with pytest.raises(ConfigError, match="key 'path' is given twice"):
        load_config(f)


def test_merge_keys_still_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: t\ndata: {path: sample}\nmodel: {<<: {family: linear, task: generation}, task: classification}\n")
    assert load_config(f).model.task == "classification"


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfen\x00a\x00", "not UTF-8 text"),
    (b"name: t\n\tseed: 0\n", "c.yaml:2:1: not valid YAML: found character '\\t' that cannot start any token"),
])
def test_unreadable_files_are_one_line_without_a_traceback(tmp_path, content, message):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
