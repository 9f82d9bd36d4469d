"""A model folder under --model-dir that the server may not read (a claim or host folder made by root with mode 0700;
the image runs as uid 10001) stops start-up with one line saying so: the folder, its owner and mode, the server's
uid and the fix, as an unreadable bundle file does. It was a PermissionError: a traceback in the log, then
"[Errno 13] Permission denied: '/models/chat'". The watcher reports the same words when it happens later.

When the tests run as root (root may read anything) the directory is scanned with the effective uid and gid of
`nobody`; otherwise the folder is made unreadable."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from tests.serving_fakes import as_another_user

from chatforge.serving.repository import ModelDirectory


@pytest.fixture()
def models():
    """``models/chat/1`` (a stand-in version folder) in a folder anyone may enter; ``chat`` itself mode 0700."""
    root = Path(tempfile.mkdtemp(prefix="chatforge-repo-perm-"))
    root.chmod(0o755)
    (root / "chat" / "1").mkdir(parents=True)
    (root / "chat").chmod(0o700)
    try:
        yield root
    finally:
        (root / "chat").chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def test_an_unreadable_model_folder_is_named_with_its_owner_mode_and_the_fix(models):
    with as_another_user() as uid:
        directory = ModelDirectory(models)
        with pytest.raises(ValueError) as e:
            directory.resolve()
        _, problems = directory.scan()
    msg = str(e.value)
    owner = os.stat(models / "chat").st_uid
    assert msg.startswith(f"permission denied: cannot read {models / 'chat'} (mode drwx------, owner uid {owner}); "
                          f"this process runs as uid {uid}"), msg
    assert f"chmod -R a+rX {models}" in msg, msg
    assert str(problems["chat"]) == msg  # what the watcher logs and alerts
