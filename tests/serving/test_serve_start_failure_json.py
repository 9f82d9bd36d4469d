"""`chatforge serve` in JSON mode (the image's CHATFORGE_LOG_FORMAT=json) that fails at start-up after its logging is
set up says why in a JSON line, like every other line it writes to stderr (README, Operations: "in JSON mode every
stderr line is a JSON object"). A conversation store it could not open was reported only as a plain
"error: conversation store ... cannot be used" line, which a JSON log pipeline (the container's or the cluster's)
does not parse: the reason a pod crash-loops was not among its structured logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _serve(tmp_path: Path, store_url: str) -> list[dict]:
    """`chatforge serve` of an empty bundle folder in JSON mode: its stderr events (each line must be JSON)."""
    (tmp_path / "bundle").mkdir()
    env = {**os.environ, "CHATFORGE_ENV": "production", "CHATFORGE_LOG_FORMAT": "json",
           "CHATFORGE_STORE_URL": store_url,
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    for name in ("CHATFORGE_METRICS_PORT", "CHATFORGE_LOG_FILE", "CHATFORGE_ALERT_WEBHOOK_URL"):
        env.pop(name, None)
    r = subprocess.run([sys.executable, "-m", "chatforge.cli", "serve", "--model", f"chat={tmp_path / 'bundle'}",
                        "--port", "0"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    events = []
    for ln in lines:
        try:
            events.append(json.loads(ln))
        except ValueError:
            raise AssertionError(f"a stderr line in JSON mode is not JSON: {ln!r}") from None
    return events


def test_a_start_up_failure_in_json_mode_is_one_json_error_line(tmp_path):
    (tmp_path / "conv.db").mkdir()  # a folder where the database file should be: SQLite cannot open it
    events = _serve(tmp_path, f"sqlite:///{tmp_path / 'conv.db'}")  # the store fails before the bundle is read
    errors = [e for e in events if e["level"] == "ERROR"]
    assert len(errors) == 1 and "cannot be used" in errors[0]["event"], events
    assert "CHATFORGE_STORE_URL" in errors[0]["event"], errors


def test_a_model_that_fails_to_load_in_json_mode_is_one_json_error_line(tmp_path):
    """The server logs a load failure itself; the CLI neither prints it as text nor logs it a second time."""
    events = _serve(tmp_path, f"sqlite:///{tmp_path / 'conv.db'}")
    errors = [e["event"] for e in events if e["level"] == "ERROR"]
    assert len(errors) == 1 and "is not a complete chatforge bundle" in errors[0], events
