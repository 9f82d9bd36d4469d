"""A version copied in place (``cp -r``, the README's own example) is one failure in the log, not one per poll.

While a big bundle is being copied, every poll sees its folder grow (a new fingerprint), retries, and fails
the same way ("incomplete metadata, file not fully covered"). Each attempt used to write an ERROR line with a
traceback and raise a critical "failed to load" alert: 7 of them for a 6 MB bundle copied at 0.8 MB/s with
--poll-interval 1, before the version loaded. A different error is still logged and alerted."""

from __future__ import annotations

import logging

from tests.serving_fakes import FakeGenerator

from chatforge.serving.repository import ModelDirectory, ModelDirectoryWatcher

LOGGER = "chatforge.serving.repository"


def _loader(path, name, version):
    weights = path / "weights.safetensors"
    if not weights.exists() or weights.stat().st_size < 10:
        raise ValueError("Error while deserializing header: incomplete metadata, file not fully covered")
    if (path / "broken").exists():
        raise RuntimeError("shape mismatch")
    gen = FakeGenerator(name)
    gen.info.version = version
    return gen


def test_a_copy_under_way_is_logged_and_alerted_once_then_swaps_in(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    (tmp_path / "chat" / "1").mkdir(parents=True)
    (tmp_path / "chat" / "1" / "weights.safetensors").write_text("0123456789")
    directory = ModelDirectory(tmp_path)
    engine = directory.load_engine(loader=_loader)
    alerts = []
    watcher = ModelDirectoryWatcher(engine, directory, poll_interval=60, loader=_loader,
                                    on_load_error=lambda name, e: alerts.append(str(e)))
    try:
        v2 = tmp_path / "chat" / "2"
        v2.mkdir()
        weights = v2 / "weights.safetensors"
        for size in range(1, 10):  # the copy grows between polls
            weights.write_text("x" * size)
            assert watcher.check_once() == []
        errors = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
        assert len(errors) == 1 and len(alerts) == 1

        (v2 / "broken").write_text("")  # another error: said again
        weights.write_text("x" * 10)
        assert watcher.check_once() == []
        assert len(alerts) == 2

        (v2 / "broken").unlink()
        assert watcher.check_once() == ["chat"]
        assert engine.version_of("chat") == "2"
    finally:
        engine.close()
