"""A run folder's ``status.json``: whether its training finished, failed, was interrupted, or is still running.

``chatforge compare`` reads it so that a run that stopped half-way is never ranked as if it had finished. The
driver writes ``running`` (with the host and pid) as training starts, then ``finished``, ``failed`` (an error) or
``interrupted`` (Ctrl-C, an Optuna prune); a run killed by SIGKILL or the OOM killer writes nothing more, so a
``running`` whose process is gone (on this host) reads as ``killed``. Folders written before this file existed
read as ``finished`` when they hold ``metrics.json`` (written last) and ``incomplete`` otherwise.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from chatforge.fileio import atomic_write_json, process_gone, process_tag

STATUS_FILE = "status.json"
FINISHED, RUNNING, FAILED, INTERRUPTED, KILLED, INCOMPLETE = (
    "finished", "running", "failed", "interrupted", "killed", "incomplete")
WRITTEN = (FINISHED, RUNNING, FAILED, INTERRUPTED)


def write_status(run_dir: str | os.PathLike, status: str, error: BaseException | None = None) -> None:
    if status not in WRITTEN:
        raise ValueError(f"run status {status!r}; allowed: {', '.join(WRITTEN)}")
    record = {"status": status, **process_tag(),
              "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if error is not None:
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}".rstrip(
            ": ")
    atomic_write_json(Path(run_dir) / STATUS_FILE, record)


def status_of_error(error: BaseException) -> str:
    """A deliberate stop (Ctrl-C, an Optuna prune) is ``interrupted``; anything else ``failed``."""
    return INTERRUPTED if isinstance(error, KeyboardInterrupt) or type(error).__name__ == "TrialPruned" else FAILED


def read_status(run_dir: str | os.PathLike) -> str:
    """finished, running, killed, failed, interrupted or incomplete (see the module docstring)."""
    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("status") in WRITTEN:
        if record["status"] == RUNNING and process_gone(record.get("host"), record.get("pid")):
            return KILLED
        return record["status"]
    return FINISHED if (run_dir / "metrics.json").is_file() else INCOMPLETE
