"""`chatforge health --service "" --service chatforge.v1.Chatbot` checks liveness and readiness on one connection and
exits 0 only when both are SERVING: the image's HEALTHCHECK probed readiness alone, so a replica whose model-directory
watcher had died (liveness NOT_SERVING, readiness still SERVING) stayed "healthy" to docker, podman and compose."""

from __future__ import annotations

from tests.serving_fakes import WAIT, ServerThread, make_engine
from typer.testing import CliRunner

from chatforge.cli import app

BOTH = ["--service", "", "--service", "chatforge.v1.Chatbot", "--timeout", str(WAIT)]


def test_both_serving_exits_0_and_prints_each():
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        r = CliRunner().invoke(app, ["health", st.target, *BOTH])
    assert r.exit_code == 0, r.output
    assert f"{st.target} (server): SERVING" in r.output and f"{st.target} chatforge.v1.Chatbot: SERVING" in r.output


def test_liveness_down_fails_even_while_ready():
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        st.server._watcher_stopped(st.loop, RuntimeError("watcher died"))  # what a dead watcher's thread calls
        runner = CliRunner()
        ready = runner.invoke(app, ["health", st.target, "--service", "chatforge.v1.Chatbot", "--timeout", str(WAIT)])
        both = runner.invoke(app, ["health", st.target, *BOTH])
    assert ready.exit_code == 0, ready.output  # readiness alone still says SERVING: why the probe needs both
    assert both.exit_code == 1, both.output
    assert f"{st.target} (server): NOT_SERVING" in both.output


def test_the_image_healthcheck_probes_liveness_and_readiness():
    from pathlib import Path

    dockerfile = (Path(__file__).resolve().parents[2] / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    [line] = [ln for ln in dockerfile.splitlines() if ln.strip().startswith("CMD [\"chatforge\", \"health\"")]
    assert '"--service", ""' in line and '"--service", "chatforge.v1.Chatbot"' in line, line
