"""A conversation store on a volume the server may not write (the operator's commonest mistake with the image:
a host folder owned by root mounted at /data, which the image's uid 10001 cannot write) fails at start-up with an
error that says so: which path, its owner and mode, the server's uid, and what to change. SQLite itself only says
"unable to open database file" (a folder) or "attempt to write a readonly database" (a file).

When the tests run as root (root may write anything) the store is opened with the effective uid and gid of
`nobody` for the duration of the call; otherwise the folder is made read-only."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from tests.serving_fakes import NOBODY, as_another_user

from chatforge.serving.store import ConversationStore, StoreConfigError


@pytest.fixture()
def data_dir():
    """A folder like a root-owned host folder mounted at /data. Made in the system's temporary folder: pytest's
    tmp_path is private to its user, and the store is opened as another."""
    root = Path(tempfile.mkdtemp(prefix="chatforge-store-perm-"))
    root.chmod(0o755)
    d = root / "data"
    d.mkdir()
    try:
        yield d
    finally:
        d.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def _open(url: str, uid_expected: int) -> str:
    with as_another_user() as uid:
        assert uid == uid_expected
        with pytest.raises(StoreConfigError) as e:
            ConversationStore(url).close()
    return str(e.value)


def test_a_store_folder_the_server_cannot_write_is_named_with_its_owner_and_mode(data_dir):
    root = os.geteuid() == 0
    data_dir.chmod(0o755 if root else 0o555)
    msg = _open(f"sqlite:///{data_dir / 'conversations.db'}", NOBODY if root else os.geteuid())
    mode = "drwxr-xr-x" if root else "dr-xr-xr-x"
    assert f"the folder {data_dir} (mode {mode}, owner uid {os.stat(data_dir).st_uid})" in msg, msg
    assert f"this process runs as uid {NOBODY if root else os.geteuid()}" in msg, msg
    assert "is not writable" in msg and "CHATFORGE_STORE_URL" in msg, msg


def test_a_store_file_the_server_cannot_write_is_named_with_its_owner_and_mode(data_dir):
    """A database left by a run as another user (e.g. root) in a folder the server may write."""
    db = data_dir / "conversations.db"
    ConversationStore(f"sqlite:///{db}").close()
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    db.chmod(0o444)
    data_dir.chmod(0o777)  # anyone may write the folder: only the file is in the way
    msg = _open(f"sqlite:///{db}", NOBODY if os.geteuid() == 0 else os.geteuid())
    assert f"the file {db} (mode -r--r--r--, owner uid {os.stat(db).st_uid})" in msg and "is not writable" in msg, msg
