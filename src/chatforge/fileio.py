"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Everything is written to a temporary name beside the target and renamed into place with
``os.replace``. Temporary files and folders are created private by ``tempfile`` (0600 / 0700),
and some writers create private files themselves (safetensors writes through its own 0600
temporary file), so just before the rename every file and folder written gets the ordinary
permissions the process umask gives (``0666 & ~umask``, ``0777 & ~umask``): bundles, run
folders and reports written by one user can be read by a server running as another, and a
stricter umask (077) is honoured, not overridden.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


def _umask() -> int:
    # Linux reports the umask in /proc; reading it there avoids os.umask(0)'s window in which
    # another thread would create files with umask 0.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions the umask gives.

    Files get ``0666 & ~umask`` (``0777 & ~umask`` if they were executable), folders
    ``0777 & ~umask``. Symbolic links are left alone.
    """
    mask = _umask()
    path = Path(path)

    def fix(p: Path, is_dir: bool) -> None:
        if p.is_symlink():
            return
        executable = is_dir or os.stat(p).st_mode & 0o111
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)

    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                fix(Path(root, d), True)
            for name in files:
                fix(Path(root, name), False)
        fix(path, True)
    else:
        fix(path, False)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    For writers that take a file name (safetensors, xgboost). Keep the target's suffix in
    ``suffix`` when the writer picks a format from the name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        apply_umask(tmp)  # mkstemp made it 0600; the writer may have replaced it with its own 0600 file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``with atomic_writer(p) as f: f.write(...)``: the file appears complete or not at all."""
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_writer(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


# Temporary folders are named after their writer, `<host>-<pid>-`: a process killed by SIGKILL (or the OOM killer)
# cleans nothing up, and the next writer of the same name can then tell a dead writer's leftover, which it removes,
# from a live writer's folder, which it leaves alone. Only this host's pids can be checked; a folder another host
# left (a shared volume) is kept, and is harmless: its name starts with a dot, which every listing skips.
def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _writer_tag() -> str:
    return f"{_host_tag()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OverflowError:
        return False
    return True


def process_tag() -> dict[str, Any]:
    """Who this process is, as ``process_gone`` reads it back: ``{"host": ..., "pid": ...}``."""
    return {"host": _host_tag(), "pid": os.getpid()}


def process_gone(host: Any, pid: Any) -> bool:
    """True only when ``(host, pid)`` (a ``process_tag``) names a process of this host that no longer runs; a
    process of another host (or a malformed tag) cannot be checked and counts as possibly running."""
    return host == _host_tag() and isinstance(pid, int) and not isinstance(pid, bool) and not _pid_alive(pid)


def _dead_writers(parent: Path, pattern: re.Pattern) -> Iterator[tuple[Path, re.Match]]:
    """Entries of ``parent`` whose names ``pattern`` matches (groups ``host`` and ``pid``) and whose writer was a
    process of this host that no longer runs."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and process_gone(m["host"], int(m["pid"])):
            yield p, m


def remove_stale_temp_dirs(target: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``target`` left beside it: ``.NAME.tmp-<host>-<pid>-*`` folders (a write that
    never finished) and ``.NAME.old-<host>-<pid>`` (the previous ``target``, moved aside for the swap: put back
    when ``target`` itself is missing, since the kill came between the two renames). Returns the paths removed."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)"
                         rf"(?:-[A-Za-z0-9_]+)?")
    removed = []
    for p, m in _dead_writers(target.parent, pattern):
        if m["kind"] == "old" and not target.exists():
            try:
                os.replace(p, target)
                logger.warning("put back %s: a writer (pid %s) was killed between moving it aside and replacing it",
                               target, m["pid"])
                continue
            except OSError:
                pass
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
            logger.info("removed %s, left by a writer of %s (pid %s) that was killed", p, target, m["pid"])
    return removed


@contextmanager
def private_temp_dir(prefix: str) -> Iterator[Path]:
    """``tempfile.TemporaryDirectory(prefix=...)`` whose name carries ``<host>-<pid>``, after removing the folders
    of the same ``prefix`` that killed processes of this host left in the temp dir (a converted model is hundreds
    of MB; a server killed while converting would otherwise leave one per start)."""
    parent = Path(tempfile.gettempdir())
    pattern = re.compile(rf"{re.escape(prefix)}(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[A-Za-z0-9_]+")
    for p, m in _dead_writers(parent, pattern):
        shutil.rmtree(p, ignore_errors=True)
        logger.info("removed %s, left by a process (pid %s) that was killed", p, m["pid"])
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{_writer_tag()}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` whole.

    The folder is ``.NAME.tmp-<host>-<pid>-<random>``; leftovers of killed writers of the same ``target`` are
    removed first (``remove_stale_temp_dirs``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{_writer_tag()}-"))
    try:
        yield tmp
        # mkdtemp made the folder 0700 and writers such as safetensors create 0600 files: the whole
        # tree gets the umask's permissions, or a server running as another user cannot read it.
        apply_umask(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{_writer_tag()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
