"""A version that failed to load for want of permissions is retried once they are fixed.

The load error says "Make the bundle readable by it, e.g. chmod -R a+rX DIR" and docs/operations.md says "fix
or remove the version folder"; a chmod or chown changes neither size nor mtime, so the watcher's fingerprint
did not change and the fixed version was never retried (until a restart or a touch)."""

from __future__ import annotations

import os

from tests.serving_fakes import FakeGenerator, watched_directory

from chatforge.serving.repository import folder_fingerprint

FILES = ("config.yaml", "metadata.json", "weights.safetensors", "tokenizer.model")


def _bundle(folder, mode=0o644):
    folder.mkdir(parents=True)
    for f in FILES:
        (folder / f).write_text(f)
        os.chmod(folder / f, mode)
    return folder


def _loader(path, name, version):
    weights = path / "weights.safetensors"
    if not os.stat(weights).st_mode & 0o004:  # as the uid-10001 server sees a root-owned 0600 file
        raise PermissionError(f"permission denied: cannot read {weights}")
    gen = FakeGenerator(name)
    gen.info.version = version
    return gen


def test_a_chmod_changes_the_fingerprint(tmp_path):
    v = _bundle(tmp_path / "v", mode=0o600)
    before = folder_fingerprint(v)
    os.chmod(v / "weights.safetensors", 0o644)
    assert folder_fingerprint(v) != before


def test_a_version_refused_for_its_permissions_is_retried_after_the_chmod_the_error_advises(tmp_path):
    _bundle(tmp_path / "chat" / "1")
    failures = []
    engine, watcher = watched_directory(tmp_path, _loader, on_load_error=lambda name, e: failures.append(name))
    try:
        v2 = _bundle(tmp_path / "chat" / "2", mode=0o600)
        assert watcher.check_once() == [] and failures == ["chat"]
        assert watcher.check_once() == [] and failures == ["chat"]  # unchanged: not retried

        for f in FILES:
            os.chmod(v2 / f, 0o644)  # chmod -R a+rX
        assert watcher.check_once() == ["chat"]
        assert engine.version_of("chat") == "2"
    finally:
        engine.close()
