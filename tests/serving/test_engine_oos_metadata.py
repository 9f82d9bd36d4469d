"""ListModels says which out-of-scope policy the Classify RPC applies (name, rule version, threshold) and, for an
ensemble, how its members are pooled."""

from __future__ import annotations

import pytest
from tests.serving_fakes import WAIT, ServerThread
from tests.test_oos import intent_cfg

from chatforge.client import ChatbotClient
from chatforge.config import validate_config
from chatforge.oos import POLICY_VERSION, OOSPolicy
from chatforge.serving.engine import Engine, load_hosted_model
from chatforge.training.run import run_experiment


def test_serving_metadata_per_policy():
    assert OOSPolicy().serving_metadata() == {"oos_policy": "train", "oos_policy_version": str(POLICY_VERSION),
                                              "oos_label": "oos"}
    assert OOSPolicy(policy="threshold", threshold=0.37).serving_metadata()["oos_threshold"] == "0.37"
    assert OOSPolicy(policy="scorer", detector_threshold=0.25).serving_metadata()["oos_threshold"] == "0.25"


@pytest.mark.slow
def test_list_models_shows_the_policy_classify_applies(tmp_path):
    res = run_experiment(validate_config(intent_cfg(tmp_path, oos={"policy": "threshold", "threshold": 0.6})),
                         run_dir=tmp_path / "run")
    model = load_hosted_model(res.bundle_dir, "intents")
    with ServerThread(Engine({}, {"intents": model})) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        meta = {m.name: m for m in client.list_models()}["intents"].metadata
        assert meta["oos_policy"] == "threshold" and meta["oos_policy_version"] == str(POLICY_VERSION)
        assert float(meta["oos_threshold"]) == 0.6 == model.oos.threshold
        # the answer follows that threshold: below it, out of scope
        pred = client.classify("please volcano the galaxy tax")
        assert pred.out_of_scope and pred.label == "oos"


@pytest.mark.slow
def test_list_models_shows_how_an_ensemble_pools(tmp_path):
    members = [run_experiment(validate_config(intent_cfg(tmp_path, name=f"m{i}", C=c)), run_dir=tmp_path / f"m{i}")
               for i, c in enumerate((1.0, 4.0))]
    tree = intent_cfg(tmp_path, family="ensemble", name="ens", members=[str(m.run_dir) for m in members],
                      method="geometric")
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "ens")
    model = load_hosted_model(res.bundle_dir, "intents")
    with ServerThread(Engine({}, {"intents": model})) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        meta = {m.name: m for m in client.list_models()}["intents"].metadata
        assert meta["ensemble_method"] == "geometric" and meta["ensemble_members"] == "linear,linear"
        assert meta["oos_policy"] == model.oos.policy
