"""A `--set key=value` whose value is not valid YAML fails in one line naming the override (exit 2), as a bad
config file does. Before, `--set 'train.lr=[1'`, an undefined alias `*a` or a `!!python/...` tag ended
`chatforge config check` and `chatforge train` in a PyYAML traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import ConfigError, apply_overrides

BAD = ["train.lr=[1", "train.lr=*a", "train.lr=!!python/object/apply:os.system [echo]", "model.d_model={a: 1"]


@pytest.mark.parametrize("override", BAD)
def test_bad_value_is_a_config_error(override):
    with pytest.raises(ConfigError, match="override") as e:
        apply_overrides({"train": {}}, [override])
    assert override.split("=", 1)[0] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["config check", "train"])
def test_cli_says_it_in_one_line(tmp_path, command):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\ndata: {path: sample}\nmodel: {family: linear, task: classification}\n")
    r = CliRunner().invoke(app, [*command.split(), str(cfg), "--set", "train.lr=[1"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "train.lr=[1" in r.output


def test_good_values_still_parse_as_yaml():
    tree = apply_overrides({}, ["train.lr=0.5", "train.epochs=3", "data.stratify=true", "x.y=", "z=[1, 2]"])
    assert tree == {"train": {"lr": 0.5, "epochs": 3}, "data": {"stratify": True}, "x": {"y": None}, "z": [1, 2]}
