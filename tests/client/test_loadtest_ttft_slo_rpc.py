"""A time-to-first-token SLO on a load test that measures none (``--rpc classify`` or ``health``) is refused before
the test runs.

``chatforge loadtest HOST --rpc classify --duration 600 --slo ttft_p99=200ms`` ran its ten minutes, then printed
"SLO ttft_p99=200ms: MISS (actual n/a)" and exited 1: a release gate failed for an objective that could never be
measured, indistinguishable from a slow server."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chatforge.cli import app


@pytest.mark.parametrize("rpc", ["classify", "health"])
def test_a_ttft_slo_without_replies_is_a_usage_error(rpc, tmp_path):
    # nothing listens on port 1: the refusal must come before any call
    r = CliRunner().invoke(app, ["loadtest", "127.0.0.1:1", "--rpc", rpc, "-n", "1", "--timeout", "1",
                                 "--slo", "p99=1s,ttft_p99=200ms", "--out", str(tmp_path / "out")],
                           env={"COLUMNS": "300"})
    out = " ".join(r.output.split())
    assert r.exit_code == 2, out
    assert f"--slo ttft_p99=200ms: time to first token is measured for --rpc reply only, not --rpc {rpc}" in out
    assert not (tmp_path / "out").exists()
