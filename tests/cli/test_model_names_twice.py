"""`chatforge serve` and `chatforge replies` name their models (--model NAME=BUNDLE, or a bundle folder named after
its run): a name given twice kept only the last bundle without a word (`serve a/chat/bundle b/chat/bundle` served
one model). It is refused, naming both folders, before anything loads."""

from __future__ import annotations

from typer.testing import CliRunner

from chatforge.cli import app


def _bundles(tmp_path):
    a, b = tmp_path / "a" / "chat" / "bundle", tmp_path / "b" / "chat" / "bundle"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    return a, b


def test_serve_refuses_two_bundles_of_the_same_run_name(tmp_path):
    a, b = _bundles(tmp_path)
    r = CliRunner().invoke(app, ["serve", str(a), str(b), "--port", "0"])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "model name 'chat' is given twice" in r.output and str(a) in r.output and str(b) in r.output


def test_replies_refuses_the_same_model_name_twice(tmp_path):
    a, b = _bundles(tmp_path)
    r = CliRunner().invoke(app, ["replies", "--model", f"x={a}", "--model", f"x={b}", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "model name 'x' is given twice" in r.output
    assert not (tmp_path / "o").exists()
