"""CLI edges: clear errors, exit codes, and the commands that need no server."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from chatforge.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_the_verbs():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for verb in ("train", "serve", "chat", "health", "tokenizer", "data", "generate"):
        assert verb in r.output


def test_config_check_prints_resolved_config():
    r = runner.invoke(app, ["config", "check", str(REPO / "configs" / "demo.yaml"), "--set", "train.epochs=2"])
    assert r.exit_code == 0, r.output
    resolved = yaml.safe_load(r.output)
    assert resolved["train"]["epochs"] == 2 and resolved["train"]["grad_clip"] == 1.0


def test_config_check_reports_bad_value(tmp_path):
    r = runner.invoke(app, ["config", "check", str(REPO / "configs" / "demo.yaml"), "--set", "train.lr=-1"])
    assert r.exit_code == 2
    assert "train.lr" in r.output and "greater than 0" in r.output


def test_train_with_bad_override_fails_before_work(tmp_path):
    r = runner.invoke(app, ["train", str(REPO / "configs" / "demo.yaml"), "--set", "model.n_heads=3",
                            "--run-dir", str(tmp_path / "run")])
    assert r.exit_code == 2
    assert "n_heads" in r.output
    assert not (tmp_path / "run").exists()


def test_tokenizer_train_command(tmp_path):
    out = tmp_path / "t.model"
    r = runner.invoke(app, ["tokenizer", "train", "--data", str(REPO / "src/chatforge/data/sample/chitchat.csv"),
                            "--vocab-size", "100000", "--out", str(out)])
    assert r.exit_code == 2 and "largest workable size" in r.output
    r = runner.invoke(app, ["tokenizer", "train", "--data", str(REPO / "src/chatforge/data/sample/chitchat.csv"),
                            "--vocab-size", "800", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file()


def test_data_download_from_local_copy(shared_data, tmp_path):
    r = runner.invoke(app, ["data", "download", "chatbot-kr", "--from", str(shared_data / "chatbot_kr"),
                            "--dest", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "chatbot_kr" / "ChatbotData.csv").is_file()
    r = runner.invoke(app, ["data", "download", "nope", "--dest", str(tmp_path)])
    assert r.exit_code == 2 and "chatbot-kr" in r.output


def test_health_of_nothing_exits_nonzero():
    r = runner.invoke(app, ["health", "127.0.0.1:1", "--timeout", "0.5"])
    assert r.exit_code == 1


def test_serve_refuses_an_unknown_precision(tmp_path):
    port_file = tmp_path / "port"
    (tmp_path / "bundle").mkdir()
    r = runner.invoke(app, ["serve", "--model", f"chat={tmp_path / 'bundle'}", "--port", "0",
                            "--port-file", str(port_file), "--precision", "fp16"])
    assert r.exit_code == 2
    assert "precision='fp16' is not supported; allowed: fp32, bf16" in r.output
    assert not port_file.exists()  # never reported ready
