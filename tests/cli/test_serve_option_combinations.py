"""`chatforge serve` refuses option combinations it would otherwise ignore silently, before any port is bound."""

from __future__ import annotations

from typer.testing import CliRunner

from chatforge.cli import app

runner = CliRunner()


def _serve(tmp_path, *args):
    port_file = tmp_path / "port"
    r = runner.invoke(app, ["serve", "--port", "0", "--port-file", str(port_file), "--drain-delay", "0", *args])
    return r, " ".join(r.output.split()), port_file


def test_pin_without_a_model_directory_is_refused(tmp_path):
    # `--pin chat=1` is a rollback; beside --model it pinned nothing and the server started anyway
    (tmp_path / "bundle").mkdir()
    r, out, port_file = _serve(tmp_path, "--model", f"chat={tmp_path / 'bundle'}", "--pin", "chat=1")
    assert r.exit_code == 2, out
    assert "--pin chooses versions under --model-dir" in out
    assert not port_file.exists()


def test_a_bare_bundle_named_like_a_model_option_is_refused(tmp_path):
    (tmp_path / "chat" / "bundle").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    r, out, _ = _serve(tmp_path, str(tmp_path / "chat" / "bundle"), "--model", f"chat={tmp_path / 'other'}")
    assert r.exit_code == 2, out
    assert "model name 'chat' is given twice" in out
