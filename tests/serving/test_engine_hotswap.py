"""Versioned model directory and hot swap: continuous requests during a swap, none fail,
responses switch to the new version; rollback by pin."""

from __future__ import annotations

import threading

import pytest
from tests.serving_fakes import WAIT, FakeGenerator, ServerThread

from chatforge.client import ChatbotClient
from chatforge.serving.repository import ModelDirectory, ModelDirectoryWatcher, version_key


def _loader(path, name, version):
    gen = FakeGenerator(name, tokens=(f"v{version}",))
    gen.info.version = version
    return gen


def test_version_order_and_pins(tmp_path):
    for v in ("1", "2", "10", ".tmp-11"):
        (tmp_path / "chat" / v).mkdir(parents=True)
    d = ModelDirectory(tmp_path)
    assert d.versions("chat") == ["1", "2", "10"]  # natural order; hidden folders ignored
    assert d.resolve()["chat"][0] == "10"
    (tmp_path / "chat" / "PINNED").write_text("2\n")
    assert d.resolve()["chat"][0] == "2"
    assert ModelDirectory(tmp_path, pins={"chat": "1"}).resolve()["chat"][0] == "1"
    (tmp_path / "chat" / "PINNED").write_text("7")
    with pytest.raises(FileNotFoundError, match="pinned to version '7'.*available: 1, 2, 10"):
        d.resolve()
    assert version_key("v1.9") < version_key("v1.10")


def test_hot_swap_under_continuous_requests_fails_none(tmp_path):
    (tmp_path / "chat" / "1").mkdir(parents=True)
    directory = ModelDirectory(tmp_path)
    engine = directory.load_engine(loader=_loader)
    watcher = ModelDirectoryWatcher(engine, directory, loader=_loader)
    versions: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    seen_new = threading.Event()
    flowing = threading.Event()

    with ServerThread(engine) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()

        def traffic():
            while not stop.is_set() and len(versions) < 5000:
                try:
                    chunks = list(client.reply_stream("hi"))
                except BaseException as e:  # noqa: BLE001 - recorded, asserted below
                    errors.append(e)
                    continue
                assert chunks[0].text == f"v{chunks[-1].model_version}"  # tokens match the version
                versions.append(chunks[-1].model_version)
                if len(versions) >= 20:
                    flowing.set()
                if versions.count("2") >= 20:
                    seen_new.set()

        threads = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        assert flowing.wait(WAIT), errors[:3]  # traffic is flowing on version 1
        (tmp_path / "chat" / "2").mkdir()
        assert watcher.check_once() == ["chat"]  # loads v2 beside v1, switches, drains v1
        assert seen_new.wait(WAIT)
        stop.set()
        for t in threads:
            t.join(WAIT)
        assert not errors, errors[:3]
        first_new = versions.index("2")
        assert set(versions[:first_new]) == {"1"} and versions.count("2") >= 20

        # Rollback by pin.
        (tmp_path / "chat" / "PINNED").write_text("1")
        assert watcher.check_once() == ["chat"]
        assert client.reply("hi") == "v1"
        assert [m.version for m in client.list_models()] == ["1"]
