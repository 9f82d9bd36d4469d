"""``lost+found`` at the root of the model directory is not a model.

The shipped Deployment mounts a volume claim's root as ``--model-dir /models`` and runs as uid 10001; an ext4
volume (a block PersistentVolume, a Filestore share, a host disk under podman ``-v``) has ``lost+found`` there,
root-owned with mode 0700. It made ``scan`` report a problem, so ``resolve`` raised at startup and the replica
exited ("Permission denied: '/models/lost+found'"), and running replicas logged and alerted it as a model
that "cannot be resolved; keeping the served version". fsck also puts recovered folders (``#1234``) in it."""

from __future__ import annotations

import os

import pytest
from tests.serving_fakes import FakeGenerator

from chatforge.serving.repository import ModelDirectory, ModelDirectoryWatcher


def _loader(path, name, version):
    if not (path / "weights.safetensors").exists():
        raise FileNotFoundError(f"{path} is not a complete chatforge bundle: missing weights.safetensors")
    gen = FakeGenerator(name)
    gen.info.version = version
    return gen


def _bundle(folder):
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_text("w")


def test_recovered_folders_in_lost_and_found_are_not_a_model(tmp_path):
    _bundle(tmp_path / "chat" / "1")
    (tmp_path / "lost+found" / "#131074").mkdir(parents=True)  # what fsck leaves
    directory = ModelDirectory(tmp_path)
    assert set(directory.resolve()) == {"chat"}
    engine = directory.load_engine(loader=_loader)
    try:
        problems = []
        watcher = ModelDirectoryWatcher(engine, directory, poll_interval=60, loader=_loader,
                                        on_problem=lambda name, message: problems.append(name),
                                        on_load_error=lambda name, e: problems.append(name))
        assert watcher.check_once() == [] and problems == []
    finally:
        engine.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-0700 folder of another owner")
def test_an_unreadable_lost_and_found_does_not_stop_a_non_root_server_starting(tmp_path):
    _bundle(tmp_path / "chat" / "1")
    (tmp_path / "lost+found").mkdir(mode=0o000)
    try:
        assert set(ModelDirectory(tmp_path).resolve()) == {"chat"}
    finally:
        os.chmod(tmp_path / "lost+found", 0o700)
