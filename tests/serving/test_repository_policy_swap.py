"""A hot swap is checked against the reply policy, as start-up is: a new classifier version that lacks an intent the
policy scripts is refused, and the served version keeps answering.

Start-up refused ``scripted: {greet: ...}`` over a classifier without the label ``greet``
(tests/serving/test_policy_scripted_labels.py), but the model directory watcher swapped such a version in, and the
scripted answer silently became unreachable on a running server."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.client import ChatbotClient
from chatforge.serving.engine import Engine
from chatforge.serving.policy import PolicyError, ReplyPolicy
from chatforge.serving.repository import ModelDirectory, ModelDirectoryWatcher

LABELS = {"1": ("greet", "bye", "oos"), "2": ("bye", "oos"), "3": ("greet", "bye", "thanks", "oos")}
POLICY = ReplyPolicy.from_dict({"classifier": "intents", "scripted": {"greet": "안녕하세요!"},
                                "fallback_reply": "잘 모르겠어요."})


def _loader(path, name, version):
    if name == "intents":
        model = FakeClassifier(name, labels=LABELS[version])
    else:
        model = FakeGenerator(name)
    model.info.version = version
    return model


@pytest.fixture
def directory(tmp_path):
    (tmp_path / "intents" / "1").mkdir(parents=True)
    (tmp_path / "chat" / "1").mkdir(parents=True)
    return ModelDirectory(tmp_path)


def test_a_version_that_breaks_the_policy_is_refused_and_the_old_one_keeps_serving(directory):
    engine = directory.load_engine(loader=_loader, policy=POLICY)
    refused: list[tuple[str, BaseException]] = []
    watcher = ModelDirectoryWatcher(engine, directory, loader=_loader,
                                    on_load_error=lambda name, e: refused.append((name, e)))
    (directory.root / "intents" / "2").mkdir()  # lacks "greet", which the policy scripts
    with ServerThread(engine) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        assert watcher.check_once() == []
        assert engine.version_of("intents") == "1"
        [(name, error)] = refused
        assert name == "intents"
        assert "version 2 of 'intents' breaks the reply policy" in str(error)
        assert "scripted intent(s) greet are not labels of classifier 'intents'" in str(error)
        assert "its labels: bye, oos" in str(error)
        assert client.reply("hello") == "안녕하세요!"  # still the scripted answer, from version 1
        # A later version that keeps the label is swapped in as usual.
        (directory.root / "intents" / "3").mkdir()
        assert watcher.check_once() == ["intents"]
        assert engine.version_of("intents") == "3"
        assert client.reply("hello") == "안녕하세요!"


def test_engine_swap_refuses_a_classifier_the_policy_cannot_use():
    engine = Engine({"chat": FakeGenerator("chat")}, {"intents": FakeClassifier(labels=LABELS["1"])},
                    policy=POLICY, continuous_batching=False)
    try:
        with pytest.raises(PolicyError, match="breaks the reply policy"):
            engine.swap("intents", FakeClassifier(labels=LABELS["2"]))
        assert engine.classifiers["intents"].labels == list(LABELS["1"])
    finally:
        engine.close()


def test_the_runbook_names_the_policy_among_the_reasons_a_version_is_refused():
    """docs/operations.md's row for the `failed to load` alert listed load errors and another task only: an operator
    paged for a refused version found no word of the policy there."""
    operations = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text(encoding="utf-8")
    [row] = [line for line in operations.splitlines() if line.startswith("| `model 'NAME' failed to load`")]
    assert "breaks the reply policy" in row and "`--policy`" in row and "breaks the pipeline" in row
    assert "`oos_labels`" in row
