"""What a writer killed by SIGKILL leaves behind is harmless and cleaned up by the next writer.

Found by a review: `chatforge convert` (and every bundle save: `atomic_dir`) killed mid-write left
`.NAME.tmp-XXXXXXXX` beside the output for ever, nothing could tell a dead writer's folder from a live one's, and
`chatforge compare` listed such a folder as a run (a half-written bundle holds a config.yaml). The CTranslate2 and
ONNX Runtime backends' conversions (`chatforge-ct2-*`, `chatforge-ort-*` in the temp dir) leaked the same way.
Temp folders now carry `<host>-<pid>`; a later writer removes those whose process is gone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from tests.process_helpers import dead_pid

from chatforge import fileio
from chatforge.evaluation.compare import find_runs
from chatforge.fileio import atomic_dir, private_temp_dir, remove_stale_temp_dirs

# A writer that gets half-way through a bundle-like folder, says so, and waits to be killed.
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from chatforge.fileio import atomic_dir
    with atomic_dir(Path(sys.argv[1])) as tmp:
        (tmp / "config.yaml").write_text("name: half\\n")
        print(tmp, flush=True)
        time.sleep(60)
""")


def test_a_sigkilled_writers_temp_folder_is_ignored_then_removed(tmp_path):
    runs = tmp_path / "runs"
    (runs / "done").mkdir(parents=True)
    (runs / "done" / "config.yaml").write_text("name: done\n")
    target = runs / "gpt2"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        left = proc.stdout.readline().strip()  # bounded: the writer prints at once or exits (EOF)
        assert left, "the writer did not start"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        proc.stdout.close()
    leftover = tmp_path / "runs" / os.path.basename(left)
    assert leftover.is_dir() and f"-{proc.pid}-" in leftover.name  # the name says whose it was
    assert find_runs(runs) == [runs / "done"]  # listing skips it
    with atomic_dir(target) as d:  # the next convert to the same output removes it
        (d / "config.yaml").write_text("name: gpt2\n")
    assert sorted(p.name for p in runs.iterdir()) == ["done", "gpt2"]


def test_live_writers_and_other_hosts_are_left_alone(tmp_path):
    target = tmp_path / "out"
    host, dead = fileio._host_tag(), dead_pid()
    mine = tmp_path / f".out.tmp-{host}-{os.getpid()}-abc123"  # a live writer (this process)
    other_host = tmp_path / f".out.tmp-{host}x-{dead}-abc123"
    stale = tmp_path / f".out.tmp-{host}-{dead}-abc123"
    other_target = tmp_path / f".outer.tmp-{host}-{dead}-abc123"
    for p in (mine, other_host, stale, other_target):
        p.mkdir()
    assert remove_stale_temp_dirs(target) == [stale]
    assert mine.is_dir() and other_host.is_dir() and other_target.is_dir() and not stale.exists()


def test_a_kill_between_the_two_renames_puts_the_old_output_back(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / f".out.old-{fileio._host_tag()}-{dead_pid()}"
    old.mkdir()
    (old / "weights").write_text("w")
    with atomic_dir(target) as d:
        assert (target / "weights").read_text() == "w"  # restored before the new write starts
        (d / "weights").write_text("new")
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("prefix", ["chatforge-ct2-", "chatforge-ort-"])
def test_backend_conversion_folders_of_killed_servers_are_removed(tmp_path, monkeypatch, prefix):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host, dead = fileio._host_tag(), dead_pid()
    stale = tmp_path / f"{prefix}{host}-{dead}-abcd1234"
    live = tmp_path / f"{prefix}{host}-{os.getpid()}-abcd1234"
    for p in (stale, live):
        (p / "ct2").mkdir(parents=True)
    with private_temp_dir(prefix) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f"{prefix}{host}-{os.getpid()}-")
        assert not stale.exists() and live.is_dir()
    assert not tmp.exists()


def test_the_architecture_names_every_conversion_folder_prefix():
    """docs/architecture.md told an operator to look for `chatforge-ct2-*` only; ONNX Runtime's are `chatforge-ort-*`."""
    root = Path(__file__).resolve().parents[1]
    prefixes = {m for p in (root / "src" / "chatforge").rglob("*.py")
                for m in re.findall(r'private_temp_dir\("([^"]+)"\)', p.read_text(encoding="utf-8"))}
    assert prefixes == {"chatforge-ct2-", "chatforge-ort-"}
    arch = (root / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert all(f"`{p}<host>-<pid>-*`" in arch for p in prefixes)
