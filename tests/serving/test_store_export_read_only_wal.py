"""Exporting a SQLite store that still has its write-ahead log (the server was killed, or still runs) from a read-only
folder: SQLite must create the -shm index beside the file to read the log and cannot. Before, the export failed with
SQLAlchemy's "(sqlite3.OperationalError) unable to open database file [SQL: PRAGMA ...] (Background on this error
...)"; now it says why and what to do, on one line. The read-only folder is a read-only bind mount (root ignores file
modes), so the test needs root and mount; elsewhere it skips."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.serving.store import ConversationStore, StoreUnreadable, Turn, export_store


@pytest.fixture
def read_only_store_with_wal(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to make a read-only bind mount")
    src, ro = tmp_path / "data", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    store = ConversationStore(f"sqlite:///{src / 'conv.db'}")
    try:
        store.record(Turn(session_id="s1", model="m", model_version="1", user_text="안녕", reply="반가워요"))
        assert store.flush(timeout=10)
        shutil.copy(src / "conv.db", tmp_path / "db.copy")  # the files as a killed server leaves them
        shutil.copy(src / "conv.db-wal", tmp_path / "wal.copy")
    finally:
        store.close()
    for name in os.listdir(src):
        os.remove(src / name)
    shutil.copy(tmp_path / "db.copy", src / "conv.db")
    shutil.copy(tmp_path / "wal.copy", src / "conv.db-wal")
    if subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True, check=False)
        if os.access(ro, os.W_OK):
            pytest.skip("the bind mount did not become read-only")
        yield src, ro
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True, check=False)


def test_the_export_says_why_and_what_to_do(read_only_store_with_wal, tmp_path):
    src, ro = read_only_store_with_wal
    with pytest.raises(StoreUnreadable, match=r"conv\.db-wal.*conv\.db-shm.*read-only; copy conv\.db and conv\.db-wal"):
        export_store(f"sqlite:///{ro / 'conv.db'}", tmp_path / "out.jsonl")
    r = CliRunner().invoke(app, ["conversations", "export", "--url", f"sqlite:///{ro / 'conv.db'}",
                                 "--out", str(tmp_path / "out.jsonl")])
    assert r.exit_code == 1 and "Traceback" not in r.output and "[SQL:" not in r.output, r.output
    assert "read-only" in r.output and not (tmp_path / "out.jsonl").exists()
    # the advice works: the same files in a writable folder export every turn, the log included
    assert export_store(f"sqlite:///{src / 'conv.db'}", tmp_path / "out.jsonl") == 1
    assert "반가워요" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")
