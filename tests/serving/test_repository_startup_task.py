"""A replica started after a wrong-task version landed must not serve the name as another task.

Running replicas refuse such a version (their watcher compares it with what the engine serves); a replica that
starts afterwards (a restart, a scale-out, a rolling update) used to load it and serve the name as the other
task, so one name meant a generator on old replicas and a classifier on new ones behind the same balancer."""

from __future__ import annotations

import json

import pytest
from tests.serving_fakes import FakeClassifier, FakeGenerator

from chatforge.serving.repository import ModelDirectory, ModelDirectoryWatcher


def _bundle(folder, task):
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"task": task}))
    return folder


def _loader(path, name, version):
    task = json.loads((path / "metadata.json").read_text())["task"]
    model = FakeGenerator(name) if task == "generation" else FakeClassifier(name)
    model.info.version = version
    return model


def test_a_replica_started_after_a_wrong_task_version_landed_does_not_serve_the_name_as_that_task(tmp_path):
    _bundle(tmp_path / "chat" / "1", "generation")
    directory = ModelDirectory(tmp_path)
    running = directory.load_engine(loader=_loader)
    watcher = ModelDirectoryWatcher(running, directory, poll_interval=60, loader=_loader)
    try:
        _bundle(tmp_path / "chat" / "2", "classification")  # a classifier published under the generator's name
        assert watcher.check_once() == []  # the running replica refuses it and keeps generating
        assert running.task_of("chat") == "generation"

        with pytest.raises(ValueError, match="keeps its task"):  # a replica starting now says why, loudly
            ModelDirectory(tmp_path).load_engine(loader=_loader).close()
    finally:
        running.close()


def test_later_versions_of_the_same_task_still_start(tmp_path):
    _bundle(tmp_path / "chat" / "1", "generation")
    _bundle(tmp_path / "chat" / "2", "generation")
    (tmp_path / "chat" / "3").mkdir()  # no metadata: loading says why, as before
    (tmp_path / "chat" / "3" / "metadata.json").write_text("{not json")
    (tmp_path / "chat" / "PINNED").write_text("2")
    engine = ModelDirectory(tmp_path).load_engine(loader=_loader)
    try:
        assert engine.task_of("chat") == "generation" and engine.version_of("chat") == "2"
    finally:
        engine.close()
