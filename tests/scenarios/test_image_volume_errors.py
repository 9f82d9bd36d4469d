"""The serving image started on volumes an operator got wrong stops at once with an error that says what to change,
as one JSON line (the image logs JSON): a root-owned host folder mounted at /data (uid 10001 cannot write it), a
conversation database left there by a run as root, and CHATFORGE_LOG_FILE on the read-only root file system.

Before: the first said "unable to open database file" (SQLite's words) in a plain line; the second started, went
ready and then held every turn as if the database were down, losing them all at shutdown; the third said
"[Errno 30] Read-only file system: '/var/log/chatforge'", naming neither the variable nor the log file.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from tests.container_helpers import LIMITS, podman

pytestmark = pytest.mark.slow


def _start(image: str, *args: str, env: dict[str, str] | None = None,
           command: tuple[str, ...] = ()) -> tuple[int | None, list[dict], list[str]]:
    """Run the image (its default command, or ``command``: arguments of one's own; no bundle is needed to fail at
    start-up) with the README's flags and ``args``: (exit code, None when it still ran after 90 s; its JSON lines;
    its other lines). podman's own lines ('time=...') are left out."""
    flags = [f for k, v in (env or {}).items() for f in ("-e", f"{k}={v}")]
    name = f"chatforge-ci-volerr-{uuid.uuid4().hex[:8]}"
    try:
        r = podman("run", "--rm", "--name", name, *LIMITS, "--network", "none", "--read-only", "--tmpfs", "/tmp",
                   "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *flags, *args, image, *command,
                   timeout=90, check=False)
        code, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:  # it started and kept serving
        code, out = None, (e.stdout or b"").decode() + (e.stderr or b"").decode()
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
    events, other = [], []
    for line in out.splitlines():
        if not line.strip() or line.startswith("time="):
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            other.append(line)
    return code, events, other


def _error(events: list[dict]) -> str:
    errors = [e["event"] for e in events if e.get("level") == "ERROR"]
    assert len(errors) == 1, events
    return errors[0]


def test_a_data_folder_the_image_user_cannot_write_is_named(serving_image, tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # owned by the user running the tests, as `mkdir` on the host makes it
    if os.geteuid() != 0:
        pytest.skip("needs a host folder owned by another uid than the container's 10001 (tests run as root in CI)")
    code, events, other = _start(serving_image, "-v", f"{data}:/data")
    assert code == 2 and not other, (code, other, events)
    msg = _error(events)
    assert "the folder /data (mode drwxr-xr-x, owner uid 0) is not writable" in msg, msg
    assert "this process runs as uid 10001" in msg and "chown -R 10001 /data" in msg, msg


def test_a_database_file_left_by_root_stops_the_start_instead_of_losing_every_turn(serving_image, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs to make a file owned by root in a folder owned by uid 10001 (tests run as root in CI)")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 10001, 10001)
    from chatforge.serving.store import ConversationStore

    db = data / "conversations.db"
    ConversationStore(f"sqlite:///{db}").close()  # a store made by a server run as root: the schema is there
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    os.chmod(db, 0o644)
    code, events, other = _start(serving_image, "-v", f"{data}:/data")
    assert code == 2 and not other, (code, other, events)
    msg = _error(events)
    assert "the file /data/conversations.db (mode -rw-r--r--, owner uid 0) is not writable" in msg, msg


def test_a_log_file_on_the_read_only_root_names_chatforge_log_file(serving_image):
    code, events, other = _start(serving_image, env={"CHATFORGE_LOG_FILE": "/var/log/chatforge/server.log"})
    assert code == 2, (code, other, events)
    # Logging is not set up when the log file fails: the CLI's one plain line says it.
    assert len(other) == 1 and other[0].startswith("error: "), (other, events)
    assert "CHATFORGE_LOG_FILE=/var/log/chatforge/server.log cannot be written: Read-only file system" in other[0]


def test_a_model_folder_the_image_user_cannot_read_is_named(serving_image, tmp_path):
    """`--model-dir /models` (the Kubernetes claim) with a model folder made by root, mode 0700: one JSON error
    naming it, not a traceback ending in "[Errno 13] Permission denied: '/models/chat'"."""
    if os.geteuid() != 0:
        pytest.skip("needs a folder owned by another uid than the container's 10001 (tests run as root in CI)")
    (tmp_path / "models" / "chat" / "1").mkdir(parents=True)
    (tmp_path / "models").chmod(0o755)
    (tmp_path / "models" / "chat").chmod(0o700)
    code, events, other = _start(serving_image, "-v", f"{tmp_path / 'models'}:/models:ro",
                                 command=("--model-dir", "/models"))
    assert code == 2 and not other, (code, other, events)
    msg = _error(events)
    assert "permission denied: cannot read /models/chat (mode drwx------, owner uid 0); this process runs as uid " \
           "10001" in msg and "chmod -R a+rX /models" in msg, msg
    assert not any("exc" in e for e in events), events
