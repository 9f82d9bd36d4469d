"""The ``oos_labels`` a reply policy or the pipeline names must be labels its classifier answers with: checked at
start-up and at a hot swap, as scripted intents are.

``oos_labels: [out_of_scope]`` over a classifier whose out-of-scope label is ``oos`` (a typo, or another classifier's
label) started a server on which that label never sent a message to the fallback, and nothing said so; a new
classifier version without the label was swapped in the same way. ``oos_labels: oos`` (a string, not a list) was
read as its letters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.client import ChatbotClient
from chatforge.predictions import ClassPrediction
from chatforge.serving.engine import Engine, PipelineConfig
from chatforge.serving.policy import PolicyError, ReplyPolicy
from chatforge.serving.repository import ModelDirectory, ModelDirectoryWatcher

FALLBACK = "잘 모르겠어요."


class OosClassifier(FakeClassifier):
    """Answers its last label (its out-of-scope one) for a message about the weather."""

    def classify(self, texts: list[str]) -> list[ClassPrediction]:
        preds = super().classify(texts)
        return [ClassPrediction(label=self.labels[-1], score=0.9, scores=p.scores) if "weather" in t else p
                for t, p in zip(texts, preds, strict=True)]


def _policy(**keys) -> ReplyPolicy:
    return ReplyPolicy.from_dict({"classifier": "intents", "fallback_reply": FALLBACK, **keys})


def _engine(classifier, **kw) -> Engine:
    return Engine({"chat": FakeGenerator("chat")}, {"intents": classifier}, continuous_batching=False, **kw)


def test_policy_oos_labels_the_classifier_lacks_are_refused_at_start():
    with pytest.raises(PolicyError, match=r"policy oos_labels: out_of_scope is not a label of classifier 'intents' "
                                          r"\(it never answers with it, .*\); its labels: bye, greet, oos"):
        _engine(FakeClassifier(labels=("greet", "bye", "oos")), policy=_policy(oos_labels=["out_of_scope", "oos"]))


def test_pipeline_oos_labels_the_classifier_lacks_are_refused_at_start():
    pipeline = PipelineConfig("intents", FALLBACK, oos_labels=("out_of_scope", "unknown"))
    with pytest.raises(ValueError, match=r"pipeline oos_labels: out_of_scope, unknown are not labels of classifier "
                                         r"'intents' .*; its labels: bye, greet, oos"):
        _engine(FakeClassifier(labels=("greet", "bye", "oos")), pipeline=pipeline)


def test_labels_it_has_start():
    for kw in ({"policy": _policy(oos_labels=["oos"])},
               {"pipeline": PipelineConfig("intents", FALLBACK, oos_labels=("oos",))}):
        _engine(FakeClassifier(labels=("greet", "bye", "oos")), **kw).close()


def test_omitted_oos_labels_need_no_oos_label():
    # Omitted, oos_labels mean "oos" where the classifier has it: a classifier without it (one that relies on a
    # threshold, or on its bundle's own out-of-scope answers) starts as before.
    for kw in ({"policy": _policy()}, {"pipeline": PipelineConfig("intents", FALLBACK)}):
        _engine(FakeClassifier(labels=("greet", "bye")), **kw).close()


def test_the_label_of_the_bundles_oos_policy_counts():
    # A threshold oos policy answers its label without the label being a column of the classifier.
    classifier = FakeClassifier(labels=("greet", "bye"))
    classifier.oos = SimpleNamespace(label="out_of_scope")
    _engine(classifier, policy=_policy(oos_labels=["out_of_scope"])).close()


def test_a_bare_string_is_refused_not_read_as_letters():
    with pytest.raises(PolicyError, match=r"oos_labels must be a list of the classifier's labels, e\.g\. \[oos\]; "
                                          r"got 'oos'"):
        _policy(oos_labels="oos")


def test_engine_swap_refuses_a_classifier_without_the_pipelines_oos_labels():
    pipeline = PipelineConfig("intents", FALLBACK, oos_labels=("oos",))
    engine = _engine(FakeClassifier(labels=("greet", "oos")), pipeline=pipeline)
    try:
        new = FakeClassifier(labels=("greet", "out_of_scope"))
        new.info.version = "2"
        with pytest.raises(ValueError, match=r"version 2 of 'intents' breaks the pipeline: pipeline oos_labels: oos "
                                             r"is not a label .*; its labels: greet, out_of_scope \(not swapped in; "
                                             r"the served version keeps answering\)"):
            engine.swap("intents", new)
        assert engine.classifiers["intents"].labels == ["greet", "oos"]
    finally:
        engine.close()


LABELS = {"1": ("greet", "bye", "oos"), "2": ("greet", "bye", "out_of_scope"), "3": ("greet", "thanks", "oos")}


def _loader(path, name, version):
    model = OosClassifier(name, labels=LABELS[version]) if name == "intents" else FakeGenerator(name)
    model.info.version = version
    return model


def test_a_version_without_the_policys_oos_label_is_refused_and_the_old_one_keeps_serving(tmp_path):
    (tmp_path / "intents" / "1").mkdir(parents=True)
    (tmp_path / "chat" / "1").mkdir(parents=True)
    directory = ModelDirectory(tmp_path)
    engine = directory.load_engine(loader=_loader, policy=_policy(oos_labels=["oos"]))
    refused: list[tuple[str, BaseException]] = []
    watcher = ModelDirectoryWatcher(engine, directory, loader=_loader,
                                    on_load_error=lambda name, e: refused.append((name, e)))
    (tmp_path / "intents" / "2").mkdir()  # its out-of-scope label is "out_of_scope"
    with ServerThread(engine) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        assert client.reply("weather tomorrow?") == FALLBACK
        assert watcher.check_once() == []
        assert engine.version_of("intents") == "1"
        [(name, error)] = refused
        assert name == "intents"
        assert "version 2 of 'intents' breaks the reply policy: policy oos_labels: oos is not a label" in str(error)
        assert "its labels: bye, greet, out_of_scope" in str(error)
        assert client.reply("weather tomorrow?") == FALLBACK  # version 1 still sends it to the fallback
        (tmp_path / "intents" / "3").mkdir()  # keeps "oos": swapped in as usual
        assert watcher.check_once() == ["intents"]
        assert engine.version_of("intents") == "3"
        assert client.reply("weather tomorrow?") == FALLBACK
