"""``chatforge conversations export``: only reads the database, and every bad argument is one clear line.

It opened a ConversationStore to export, which made the ``turns`` table and its indexes (and set WAL) in any
SQLite file it was given: an empty file or another application's database exited 0 "exported 0 turns" and was
changed. ``--since 99999999d`` and ``--out <a directory>`` ended in tracebacks."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.serving.store import ConversationStore, Turn

OLD_COLUMNS = ("id INTEGER PRIMARY KEY AUTOINCREMENT, created_at DATETIME NOT NULL, session_id VARCHAR(128), "
               "request_id VARCHAR(128), model VARCHAR(256), model_version VARCHAR(64), user_text TEXT, reply TEXT, "
               "intent VARCHAR(256), intent_score FLOAT, ttft_ms FLOAT, latency_ms FLOAT, status VARCHAR(64)")


def _export(*args: str):
    return CliRunner().invoke(app, ["conversations", "export", *args], env={"COLUMNS": "300"})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _failed_cleanly(r, code: int) -> None:
    """Exit ``code`` through typer (one error line), not an exception's traceback."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output and r.output.count("error:") == 1


@pytest.fixture
def store_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'conv.db'}"
    with ConversationStore(url) as s:
        s.record(Turn(session_id="s", user_text="old", created_at=datetime.now(timezone.utc) - timedelta(days=3)))
        s.record(Turn(session_id="s", user_text="new", context=[{"role": "user", "text": "안녕"}]))
    return url


@pytest.mark.parametrize("since", ["99999999d", "9" * 5000 + "m", "0001-01-01T00:00:00+01:00",
                                   "9999-12-31T23:59:59-01:00"],
                         ids=["age-before-year-1", "age-of-5000-digits", "before-year-1-in-utc", "after-9999-in-utc"])
def test_a_since_out_of_range_names_the_range(store_url, tmp_path, since):
    r = _export("--url", store_url, "--out", str(tmp_path / "t.jsonl"), "--since", since)
    _failed_cleanly(r, 2)  # was OverflowError (or int()'s ValueError) with a traceback
    assert "is out of range; allowed: a date/time from 0001-01-01 to 9999-12-31 (UTC), or an age up to" in r.output
    assert not (tmp_path / "t.jsonl").exists()


def test_an_out_that_is_a_directory_is_refused(store_url, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    r = _export("--url", store_url, "--out", str(runs))
    _failed_cleanly(r, 2)  # was IsADirectoryError
    assert f"--out {runs} is a directory" in r.output and "turns.jsonl" in r.output
    assert list(runs.iterdir()) == []


def test_an_out_that_cannot_be_written_is_one_line(store_url, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _export("--url", store_url, "--out", str(blocker / "t.jsonl"))  # its parent is a file
    _failed_cleanly(r, 1)
    assert f"cannot write --out {blocker / 't.jsonl'}" in r.output


def test_an_empty_file_is_no_store_and_stays_empty(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    r = _export("--url", f"sqlite:///{empty}", "--out", str(tmp_path / "t.jsonl"))
    _failed_cleanly(r, 2)  # was exit 0, "exported 0 turns"
    assert "holds no conversation table ('turns')" in r.output
    assert empty.stat().st_size == 0  # the schema was made in it (and WAL set)
    assert not (tmp_path / "t.jsonl").exists()


def test_another_applications_database_is_left_as_it_was(tmp_path):
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users (name) VALUES ('kim')")
    db.close()
    before = _digest(other)
    r = _export("--url", f"sqlite:///{other}", "--out", str(tmp_path / "t.jsonl"))
    _failed_cleanly(r, 2)
    assert "holds no conversation table" in r.output
    assert _digest(other) == before  # no turns table, no indexes, not switched to WAL
    with sqlite3.connect(other) as db:
        assert [n for (n,) in db.execute("SELECT name FROM sqlite_master")] == ["users"]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    db.close()


def test_a_turns_table_of_something_else_is_named(tmp_path):
    other = tmp_path / "game.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE turns (player TEXT, move TEXT)")
    db.close()
    r = _export("--url", f"sqlite:///{other}", "--out", str(tmp_path / "t.jsonl"))
    _failed_cleanly(r, 2)
    assert "is not a conversation table" in r.output


def test_a_store_is_exported_without_being_written(store_url, tmp_path):
    db = Path(store_url.removeprefix("sqlite:///"))
    before = _digest(db)
    out = tmp_path / "t.jsonl"
    r = _export("--url", store_url, "--out", str(out), "--since", "24h")
    assert r.exit_code == 0, r.output
    assert "exported 1 turns" in r.output
    [row] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert (row["user_text"], row["context"]) == ("new", [{"role": "user", "text": "안녕"}])
    assert row["created_at"].endswith("+00:00")
    assert _digest(db) == before


def test_a_store_of_the_first_schema_is_exported_as_it_is(tmp_path):
    """Exporting migrated an older store in place (ALTER TABLE): now its missing columns export as empty."""
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as db:
        db.execute(f"CREATE TABLE turns ({OLD_COLUMNS})")
        db.execute("INSERT INTO turns (created_at, session_id, user_text, reply, status) "
                   "VALUES ('2026-01-02 03:04:05', 's', 'old question', 'old reply', 'OK')")
    db.close()
    before = _digest(old)
    out = tmp_path / "t.csv"
    r = _export("--url", f"sqlite:///{old}", "--out", str(out), "--format", "csv")
    assert r.exit_code == 0, r.output
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0].endswith(",context,context_turns,path,traffic") and len(lines) == 2
    assert lines[1].startswith("1,s,,,,old question,old reply,") and lines[1].endswith(",2026-01-02T03:04:05+00:00,,,,")
    assert _digest(old) == before
