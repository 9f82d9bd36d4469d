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
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


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


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        # mkdtemp made the folder 0700 and writers such as safetensors create 0600 files: the whole
        # tree gets the umask's permissions, or a server running as another user cannot read it.
        apply_umask(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
