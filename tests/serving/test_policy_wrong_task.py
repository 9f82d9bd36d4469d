"""A reply policy naming a hosted model of another task: the startup error says which task it is, not that it is
missing (`chatforge serve --model-dir` with a classifier named as the retriever said "'intent' is not hosted")."""

from __future__ import annotations

import pytest
from tests.serving.test_policy import FakeSelector
from tests.serving_fakes import FakeClassifier, FakeGenerator

from chatforge.serving.engine import Engine
from chatforge.serving.policy import PolicyError, ReplyPolicy


def _engine(**policy) -> Engine:
    doc = {"fallback_reply": "잘 모르겠어요.", "generate": False, **policy}
    return Engine({"echo": FakeGenerator()}, {"intents": FakeClassifier()}, retrievers={"selector": FakeSelector()},
                  policy=ReplyPolicy.from_dict(doc), continuous_batching=False)


@pytest.mark.parametrize(("policy", "message"), [
    ({"retriever": "intents"}, "policy retriever 'intents' is a classification model; selection models: selector"),
    ({"retriever": "echo"}, "policy retriever 'echo' is a generation model; selection models: selector"),
    ({"classifier": "selector"}, "policy classifier 'selector' is a selection model; classifiers: intents"),
    ({"retriever": "nope"}, "policy retriever 'nope' is not hosted; selection models: selector"),
])
def test_a_policy_naming_a_model_of_another_task_says_which_task(policy, message):
    with pytest.raises(PolicyError) as err:
        _engine(**policy).close()
    assert str(err.value) == message
