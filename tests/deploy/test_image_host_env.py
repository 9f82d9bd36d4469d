"""The serving image listens on every interface whatever arguments it is given. Its default command passed
`--host 0.0.0.0`, and `serve` binds 127.0.0.1 by default, so an operator who gave arguments of their own (the README:
"arguments of your own replace the default command"; e.g. `chatforge:0.1.0 --model-dir /models`) got a server
bound to the container's loopback: unreachable through every published port, while its HEALTHCHECK (which runs
inside the container, on 127.0.0.1) said healthy. The image now sets CHATFORGE_HOST=0.0.0.0, which `serve` reads
(the flag still wins), as it does CHATFORGE_METRICS_PORT."""

from __future__ import annotations

import re

import pytest
from tests.deploy_helpers import REPO


@pytest.mark.parametrize(("env", "argv", "expected"), [
    ({"CHATFORGE_HOST": "0.0.0.0"}, [], "0.0.0.0"),                     # the image sets this
    ({"CHATFORGE_HOST": "0.0.0.0"}, ["--host", "127.0.0.1"], "127.0.0.1"),  # the flag wins
    ({}, [], "127.0.0.1"),                                               # neither: loopback, as before
])
def test_serve_reads_the_host_from_the_environment(tmp_path, monkeypatch, env, argv, expected):
    from typer.testing import CliRunner

    import chatforge.serving.server as server
    from chatforge.cli import app

    seen = {}
    monkeypatch.setattr(server, "run_server", lambda config, **kw: seen.update(config=config))
    monkeypatch.delenv("CHATFORGE_HOST", raising=False)
    monkeypatch.delenv("CHATFORGE_METRICS_PORT", raising=False)
    (tmp_path / "bundle").mkdir()
    r = CliRunner().invoke(app, ["serve", "--model", f"chat={tmp_path / 'bundle'}", "--port", "0", *argv], env=env)
    assert r.exit_code == 0, r.output
    assert seen["config"].host == expected


def test_the_image_listens_on_every_interface_without_its_default_command():
    text = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    env = next(line for line in text.splitlines() if line.startswith("ENV PATH="))
    assert re.search(r"\bCHATFORGE_HOST=0\.0\.0\.0\b", env), env
