"""A watcher stuck in one poll is as deaf to the folder as a dead one, and liveness must say so.

Found by pointing a version's weights.safetensors at a FIFO (the same blocking read a hung NFS hard mount
gives): the poll never returned, later versions of every model were never swapped in, no line was logged,
and gRPC health "" and /healthz stayed SERVING/200 because the watcher's thread was still alive."""

from __future__ import annotations

import threading

from tests.serving_fakes import WAIT, FakeGenerator

from chatforge.serving.repository import ModelDirectory, ModelDirectoryWatcher


def test_a_poll_that_never_returns_is_reported_like_a_stopped_watcher(tmp_path):
    (tmp_path / "chat" / "1").mkdir(parents=True)
    release = threading.Event()

    def loader(path, name, version):
        if version == "2":
            release.wait(WAIT)  # a read that does not return
        gen = FakeGenerator(name)
        gen.info.version = version
        return gen

    directory = ModelDirectory(tmp_path)
    engine = directory.load_engine(loader=loader)
    reasons: list[BaseException | None] = []
    reported = threading.Event()

    def on_stopped(reason):
        reasons.append(reason)
        reported.set()

    watcher = ModelDirectoryWatcher(engine, directory, poll_interval=0.01, loader=loader, on_stopped=on_stopped,
                                    stall_timeout=0.3)
    try:
        watcher.start()
        (tmp_path / "chat" / "2").mkdir()
        assert reported.wait(WAIT), "a poll stuck in a read was never reported"
        assert isinstance(reasons[0], TimeoutError)
    finally:
        release.set()
        watcher.stop()
        engine.close()
    assert len(reasons) == 1  # reported once


def test_a_healthy_watcher_is_never_reported(tmp_path):
    (tmp_path / "chat" / "1").mkdir(parents=True)

    def loader(path, name, version):
        gen = FakeGenerator(name)
        gen.info.version = version
        return gen

    directory = ModelDirectory(tmp_path)
    engine = directory.load_engine(loader=loader)
    reasons = []
    watcher = ModelDirectoryWatcher(engine, directory, poll_interval=0.01, loader=loader,
                                    on_stopped=reasons.append, stall_timeout=0.5)
    polls, enough = [], threading.Event()
    check_once = watcher.check_once

    def counted():
        swapped = check_once()
        polls.append(swapped)
        if len(polls) >= 100:  # 100 polls of 10 ms each: twice the stall timeout has passed, in short polls
            enough.set()
        return swapped

    watcher.check_once = counted
    try:
        (tmp_path / "chat" / "2").mkdir()
        watcher.start()
        assert enough.wait(WAIT)
        assert engine.version_of("chat") == "2" and ["chat"] in polls
    finally:
        watcher.stop()
        engine.close()
    assert reasons == []
