"""CHATFORGE_LOG_FILE naming a place the server cannot write (in the image: anywhere but /data and /tmp, the root
file system being read-only) stops `chatforge serve` with one line that names the variable, the path and why. It
said only "error: [Errno 30] Read-only file system: '/var/log/chatforge'", naming neither the variable nor that it
was about the log file."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.serving.observability import configure_logging
from chatforge.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[2]


def test_a_log_file_that_cannot_be_opened_names_the_variable_and_leaves_the_handlers(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    path = tmp_path / "not-a-folder" / "server.log"
    logger = logging.getLogger("chatforge-test-log-file-errors")
    before = list(logger.handlers)
    configure_logging(Settings(env="production"), logger=logger)
    installed = list(logger.handlers)
    try:
        with pytest.raises(SettingsError) as e:
            configure_logging(Settings(env="production", log_file=path), logger=logger)
        msg = str(e.value)
        assert f"CHATFORGE_LOG_FILE={path}" in msg and "cannot be written" in msg, msg
        assert "Not a directory" in msg or "File exists" in msg, msg
        assert logger.handlers == installed  # the working configuration stays
    finally:
        for h in logger.handlers[len(before):]:
            logger.removeHandler(h)


def test_serve_exits_with_one_line_naming_chatforge_log_file(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    (tmp_path / "bundle").mkdir()
    path = tmp_path / "not-a-folder" / "server.log"
    env = {**os.environ, "CHATFORGE_ENV": "production", "CHATFORGE_LOG_FILE": str(path),
           "CHATFORGE_STORE_URL": f"sqlite:///{tmp_path / 'conv.db'}", "COLUMNS": "300",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("CHATFORGE_METRICS_PORT", None)
    r = subprocess.run([sys.executable, "-m", "chatforge.cli", "serve", "--model", f"chat={tmp_path / 'bundle'}",
                        "--port", "0"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert f"CHATFORGE_LOG_FILE={path} cannot be written" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
