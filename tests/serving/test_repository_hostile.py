"""The model repository's watcher under hostile directories: a version the engine refuses, a
half-written version, a bad PINNED file. Each is refused for its own model only, logged once,
and never stops the watcher or later swaps. Driven through ``check_once``, no sleeps."""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, watched_directory

from chatforge.serving.repository import ModelDirectory, ModelDirectoryWatcher

LOGGER = "chatforge.serving.repository"
BUNDLE_FILES = ("config.yaml", "metadata.json", "weights.safetensors", "tokenizer.model")


class ClosableClassifier(FakeClassifier):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _generator(name, version):
    gen = FakeGenerator(name, tokens=(f"v{version}",))
    gen.info.version = version
    return gen


class Loader:
    """Loads fakes; folders holding a file ``classifier`` load as classifiers, and folders lacking a
    bundle file fail as ``load_hosted_model`` does for a half-written bundle."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.made: list = []
        self.during_load = None  # called with the folder while a load runs

    def __call__(self, path, name, version):
        self.calls.append((name, version))
        if self.during_load is not None:
            self.during_load(path)
        if (path / "classifier").exists():
            model = ClosableClassifier(name)
            model.info.version = version
        else:
            missing = [f for f in BUNDLE_FILES if not (path / f).exists()]
            if missing:
                raise FileNotFoundError(f"{path}: missing {', '.join(missing)}")
            model = _generator(name, version)
        self.made.append(model)
        return model


def _bundle(folder, files=BUNDLE_FILES, classifier=False):
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_text(f)
    if classifier:
        (folder / "classifier").write_text("")
    return folder


@pytest.fixture
def served(tmp_path):
    """(root, loader, engine, watcher, alerts) over root/chat/1, a generator."""
    _bundle(tmp_path / "chat" / "1")
    loader = Loader()
    alerts: list[tuple[str, BaseException]] = []
    engine, watcher = watched_directory(tmp_path, loader, on_load_error=lambda name, e: alerts.append((name, e)))
    try:
        yield tmp_path, loader, engine, watcher, alerts
    finally:
        engine.close()


def _records(caplog, level, text):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level and text in r.getMessage()]


# ------------------------------------------------------------------ 1. a version the engine refuses


def test_a_version_of_the_wrong_task_is_refused_once_and_later_versions_still_swap(served, caplog):
    root, loader, engine, watcher, alerts = served
    caplog.set_level(logging.INFO, logger=LOGGER)
    _bundle(root / "chat" / "3", classifier=True)  # a classifier under a generator's name

    assert watcher.check_once() == []  # refused, not raised
    assert engine.version_of("chat") == "1"
    assert [(n, type(e)) for n, e in alerts] == [("chat", ValueError)]  # the load-failure alert path
    assert len(_records(caplog, logging.ERROR, "version 3")) == 1
    assert loader.made[-1].closed  # the refused model was released

    for _ in range(3):  # unchanged: not loaded, logged or alerted again
        assert watcher.check_once() == []
    assert loader.calls.count(("chat", "3")) == 1
    assert len(alerts) == 1 and len(_records(caplog, logging.ERROR, "version 3")) == 1

    _bundle(root / "chat" / "4")
    assert watcher.check_once() == ["chat"]
    assert engine.version_of("chat") == "4" and watcher.swaps == 1


def test_a_failing_alert_sink_does_not_stop_other_models(tmp_path):
    _bundle(tmp_path / "chat" / "1")
    _bundle(tmp_path / "zeta" / "1")
    loader = Loader()
    directory = ModelDirectory(tmp_path)
    engine = directory.load_engine(loader=loader)

    def broken_sink(name, e):
        raise RuntimeError("webhook down")

    watcher = ModelDirectoryWatcher(engine, directory, poll_interval=60, loader=loader, on_load_error=broken_sink)
    try:
        _bundle(tmp_path / "chat" / "2", files=("config.yaml",))  # fails to load, then the sink fails
        _bundle(tmp_path / "zeta" / "2")
        assert watcher.check_once() == ["zeta"]
        assert engine.version_of("chat") == "1" and engine.version_of("zeta") == "2"
    finally:
        engine.close()


def test_the_watcher_thread_survives_a_poll_that_raises(served):
    _, _, _, watcher, _ = served
    watcher.poll_interval = 0.001
    calls = 0
    second = threading.Event()

    def check_once():
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        second.set()
        return []

    watcher.check_once = check_once  # what run() calls each poll
    watcher.start()
    try:
        assert second.wait(WAIT), "the watcher thread died after one failed poll"
        assert watcher._thread.is_alive()
    finally:
        watcher.stop()


# ------------------------------------------------------------------ 2. a half-written version


def test_a_half_written_version_is_retried_once_its_folder_changes(served, caplog):
    root, loader, engine, watcher, alerts = served
    caplog.set_level(logging.INFO, logger=LOGGER)
    v2 = _bundle(root / "chat" / "2", files=("config.yaml", "metadata.json"))

    assert watcher.check_once() == []
    assert engine.version_of("chat") == "1"
    for _ in range(3):  # unchanged: no retry, no new log line or alert
        assert watcher.check_once() == []
    assert loader.calls.count(("chat", "2")) == 1 and len(alerts) == 1
    assert len(_records(caplog, logging.ERROR, "chat version 2")) == 1

    (v2 / "weights.safetensors").write_text("weights")
    (v2 / "tokenizer.model").write_text("tok")
    assert watcher.check_once() == ["chat"]
    assert engine.version_of("chat") == "2"


def test_a_file_rewritten_in_place_makes_the_failed_version_retried(served):
    root, loader, engine, watcher, _ = served
    v2 = _bundle(root / "chat" / "2")
    def truncated(path):
        raise OSError("weights truncated")

    loader.during_load = truncated
    assert watcher.check_once() == []
    assert watcher.check_once() == []
    assert loader.calls.count(("chat", "2")) == 1

    loader.during_load = None
    st = os.stat(v2 / "weights.safetensors")  # same names and sizes, only a newer mtime
    os.utime(v2 / "weights.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert watcher.check_once() == ["chat"]
    assert engine.version_of("chat") == "2"


def test_files_that_land_while_a_load_fails_make_the_next_poll_retry(served):
    """The fingerprint is taken before loading: the copy finishing during a failed load counts."""
    root, loader, engine, watcher, _ = served
    v2 = _bundle(root / "chat" / "2", files=("config.yaml", "metadata.json"))

    def copy_finishes(path):
        loader.during_load = None
        (v2 / "weights.safetensors").write_text("weights")
        (v2 / "tokenizer.model").write_text("tok")
        raise FileNotFoundError("missing weights.safetensors (read before the copy finished)")

    loader.during_load = copy_finishes
    assert watcher.check_once() == []
    assert watcher.check_once() == ["chat"]
    assert engine.version_of("chat") == "2"


# ------------------------------------------------------------------ 3. a bad PINNED file


def test_a_bad_pin_holds_back_only_its_own_model_and_is_logged_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    _bundle(tmp_path / "chat" / "1")
    _bundle(tmp_path / "intent" / "1", classifier=True)
    loader = Loader()
    directory = ModelDirectory(tmp_path)
    engine = directory.load_engine(loader=loader)
    watcher = ModelDirectoryWatcher(engine, directory, poll_interval=60, loader=loader)
    try:
        (tmp_path / "chat" / "PINNED").write_text("7\n")
        _bundle(tmp_path / "intent" / "2", classifier=True)
        assert watcher.check_once() == ["intent"]
        assert engine.version_of("intent") == "2" and engine.version_of("chat") == "1"
        for _ in range(3):
            assert watcher.check_once() == []
        assert len(_records(caplog, logging.WARNING, "pinned to version '7'")) == 1

        (tmp_path / "chat" / "PINNED").write_text("8\n")  # a different problem: logged, once
        watcher.check_once()
        watcher.check_once()
        assert len(_records(caplog, logging.WARNING, "pinned to version '8'")) == 1

        _bundle(tmp_path / "chat" / "8")  # the pin now resolves
        assert watcher.check_once() == ["chat"]
        assert engine.version_of("chat") == "8"
    finally:
        engine.close()


def test_startup_still_refuses_a_bad_pin(tmp_path):
    _bundle(tmp_path / "chat" / "1")
    (tmp_path / "chat" / "PINNED").write_text("7")
    with pytest.raises(FileNotFoundError, match="pinned to version '7'"):
        ModelDirectory(tmp_path).resolve()


# ------------------------------------------------------------------ 4. told by the bundle's metadata, alerts, the thread


def _metadata(folder, task):
    (folder / "metadata.json").write_text(json.dumps({"task": task, "family": "transformer"}))
    return folder


def test_a_wrong_task_version_is_refused_from_its_metadata_without_loading_its_weights(served):
    root, loader, engine, watcher, alerts = served
    _metadata(_bundle(root / "chat" / "2", classifier=True), "classification")

    assert watcher.check_once() == []
    assert ("chat", "2") not in loader.calls  # refused before the loader ran: no weights read beside the served ones
    assert engine.version_of("chat") == "1"
    [(name, error)] = alerts
    assert name == "chat" and "serves generation" in str(error) and "classification bundle" in str(error)

    _metadata(_bundle(root / "chat" / "3"), "generation")  # the right task loads and swaps as before
    assert watcher.check_once() == ["chat"] and engine.version_of("chat") == "3"


def test_a_bad_pin_is_reported_once_per_distinct_problem(tmp_path):
    _bundle(tmp_path / "chat" / "1")
    problems: list[tuple[str, str]] = []
    engine, watcher = watched_directory(tmp_path, Loader(),
                                        on_problem=lambda name, message: problems.append((name, message)))
    try:
        (tmp_path / "chat" / "PINNED").write_text("7\n")
        for _ in range(3):
            watcher.check_once()
        (tmp_path / "chat" / "PINNED").write_text("8\n")
        watcher.check_once()
        assert [(n, "'7'" in m, "'8'" in m) for n, m in problems] == [("chat", True, False), ("chat", False, True)]
    finally:
        engine.close()


class _Fatal(BaseException):
    """What no ``except Exception`` catches (a loader calling sys.exit, say)."""


def test_a_watcher_thread_that_ends_unasked_says_so_once(served):
    root, loader, engine, watcher, _ = served
    stopped: list[BaseException | None] = []
    ended = threading.Event()
    watcher.on_stopped = lambda reason: (stopped.append(reason), ended.set())

    def fatal(path):
        raise _Fatal("loader gave up")

    loader.during_load = fatal
    _bundle(root / "chat" / "2")
    watcher.poll_interval = 0.01
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: None  # the thread's own traceback is expected here
    try:
        watcher.start()
        assert ended.wait(WAIT)
        watcher._thread.join(WAIT)
    finally:
        threading.excepthook = previous_hook
    assert [type(r) for r in stopped] == [_Fatal] and not watcher.alive
    assert engine.version_of("chat") == "1"


def test_a_watcher_stopped_on_purpose_reports_nothing(served):
    _, _, _, watcher, _ = served
    stopped: list = []
    watcher.on_stopped = stopped.append
    watcher.poll_interval = 0.01
    watcher.start()
    assert watcher.alive
    watcher.stop()
    assert not watcher.alive and stopped == []
