"""Removing every version of a served model is said once, not passed over in silence.

The watcher keeps serving what it loaded (a model is never unloaded by a scan), but a replica started
afterwards does not host the name at all: the fleet splits with nothing in the log or the alerts."""

from __future__ import annotations

import logging
import shutil

from tests.serving_fakes import FakeGenerator, watched_directory

LOGGER = "chatforge.serving.repository"


def _loader(path, name, version):
    gen = FakeGenerator(name)
    gen.info.version = version
    return gen


def test_a_model_whose_versions_were_all_removed_is_reported_once_and_keeps_serving(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    for name in ("chat", "other"):
        (tmp_path / name / "1").mkdir(parents=True)
    problems = []
    engine, watcher = watched_directory(tmp_path, _loader, on_problem=lambda name, message: problems.append(name))
    try:
        shutil.rmtree(tmp_path / "chat" / "1")
        for _ in range(3):
            assert watcher.check_once() == []
        assert problems == ["chat"]  # once, not per poll
        warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "has no version" in warnings[0].getMessage()
        assert engine.version_of("chat") == "1"  # still served

        (tmp_path / "chat" / "1").mkdir()
        assert watcher.check_once() == []
        assert any("problem with 'chat' is gone" in r.getMessage() for r in caplog.records)
    finally:
        engine.close()
