"""Cross-fitting oos policies (chatforge.evaluation.crossfit) and ``evaluate --cross-fit``."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from tests.test_oos import intent_cfg
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.evaluation.crossfit import cross_fit, folds_by_label, threshold_fit_apply
from chatforge.evaluation.evaluate import EvaluationError, evaluate_bundle
from chatforge.evaluation.metrics import apply_oos_threshold, choose_oos_threshold, oos_metrics
from chatforge.training.run import run_experiment

OOS = "oos"


def test_folds_deal_every_label_evenly_and_repeat_with_the_seed():
    y = ["a"] * 23 + ["b"] * 7 + [OOS] * 10
    fold = folds_by_label(y, 5, np.random.default_rng(3))
    for label in set(y):
        counts = Counter(int(f) for f, v in zip(fold, y, strict=True) if v == label)
        assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == y.count(label)
    assert (fold == folds_by_label(y, 5, np.random.default_rng(3))).all()
    assert not (fold == folds_by_label(y, 5, np.random.default_rng(4))).all()
    with pytest.raises(ValueError, match="at least 2 folds"):
        folds_by_label(y, 1, np.random.default_rng(0))


def test_cross_fit_never_lets_a_prediction_see_its_own_label():
    y = ["a", "b", OOS] * 10
    seen = []

    def fit_apply(fit, app):
        assert not set(fit) & set(app) and len(fit) + len(app) == len(y)
        seen.append(app)
        majority = Counter(y[i] for i in fit).most_common(1)[0][0]
        return [majority] * len(app)

    out = cross_fit(y, fit_apply, OOS, folds=3, repeats=4)
    assert len(seen) == 12 and sorted(np.concatenate(seen[:3]).tolist()) == list(range(len(y)))
    assert out["folds"] == 3 and out["repeats"] == 4
    assert out["min_in_scope_accuracy"] <= out["in_scope_accuracy"] and out["min_oos_recall"] <= out["oos_recall"]
    oracle = cross_fit(y, lambda fit, app: [y[i] for i in app], OOS, folds=3, repeats=2)
    assert oracle["in_scope_accuracy"] == oracle["oos_recall"] == 1.0
    with pytest.raises(ValueError, match="in-scope and 'oos'"):
        cross_fit(["a", "b"], fit_apply, OOS)


def test_threshold_cross_fit_equals_a_fold_loop_written_out():
    rng = np.random.default_rng(0)
    labels = ["a", "b", OOS]
    y = ["a"] * 20 + ["b"] * 20 + [OOS] * 10
    probs = rng.dirichlet([1, 1, 1], size=len(y))
    for i, v in enumerate(y):  # in-scope rows lean to their label
        if v != OOS:
            probs[i, labels.index(v)] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    got = cross_fit(y, threshold_fit_apply(probs, labels, y, OOS, 0.05), OOS, folds=5, repeats=3, seed=7)
    rng2, runs = np.random.default_rng(7), []
    for _ in range(3):
        fold = folds_by_label(y, 5, rng2)
        pred = [None] * len(y)
        for j in range(5):
            fit = [i for i in range(len(y)) if fold[i] != j]
            t, _ = choose_oos_threshold(probs[fit], [y[i] for i in fit], labels, OOS, max_in_scope_drop=0.05)
            for i in (i for i in range(len(y)) if fold[i] == j):
                pred[i] = apply_oos_threshold(probs[i : i + 1], labels, t, OOS)[0]
        runs.append(oos_metrics(y, pred, OOS))
    assert got["in_scope_accuracy"] == pytest.approx(np.mean([r["in_scope_accuracy"] for r in runs]))
    assert got["oos_recall"] == pytest.approx(np.mean([r["oos_recall"] for r in runs]))
    assert got["min_oos_recall"] == pytest.approx(min(r["oos_recall"] for r in runs))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crossfit")
    out = {}
    for policy in ("scorer", "threshold", "train"):
        (tmp / policy).mkdir()
        cfg = intent_cfg(tmp / policy, oos={"policy": policy}, name=f"intent-{policy}")
        out[policy] = run_experiment(validate_config(cfg), run_dir=tmp / policy / "run").bundle_dir
    return out


@pytest.mark.parametrize("policy", ["scorer", "threshold"])
def test_evaluate_cross_fits_a_policy_fitted_on_the_split(bundles, tmp_path, policy):
    ev = evaluate_bundle(bundles[policy], out_dir=tmp_path / "e", track=False, cross_fit=3, cross_fit_repeats=2)
    m = ev.summary["metrics"]
    assert m["oos_policy_fitted_on_this_split"] is True  # the run's own validation split
    cf = m["cross_fitted"]
    assert (cf["folds"], cf["repeats"]) == (3, 2)
    assert 0.0 <= cf["min_in_scope_accuracy"] <= cf["in_scope_accuracy"] <= 1.0
    assert 0.0 <= cf["min_oos_recall"] <= cf["oos_recall"] <= 1.0
    md = (tmp_path / "e" / "evaluation.md").read_text()
    assert "cross-fitted, 3-fold x 2" in md and "fitted on this split" in md
    assert json.loads((tmp_path / "e" / "evaluation.json").read_text())["metrics"]["cross_fitted"] == cf


def test_evaluate_cross_fit_of_a_train_policy_and_of_data_without_oos(bundles, tmp_path):
    m = evaluate_bundle(bundles["train"], out_dir=tmp_path / "e", track=False, cross_fit=3).summary["metrics"]
    assert m["cross_fitted"] is None and "oos_policy_fitted_on_this_split" not in m
    with pytest.raises(EvaluationError, match="labelled 'oos'"):
        evaluate_bundle(bundles["scorer"], clinc_keys=["val"], out_dir=tmp_path / "f", track=False, cross_fit=3)


def test_cli_evaluate_shows_cross_fitted_rows_and_refuses_one_fold(bundles, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["evaluate", str(bundles["scorer"]), "--cross-fit", "3", "--cross-fit-repeats", "2",
                            "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert "cross-fitted (3-fold x 2; worst)" in r.output and "in-sample" in r.output
    r = runner.invoke(app, ["evaluate", str(bundles["scorer"]), "--cross-fit", "1", "--out", str(tmp_path / "f")])
    assert r.exit_code != 0 and "at least 2 folds" in r.output


def test_binary_policy_is_cross_fitted_as_it_is_fitted_without_the_accuracy_bound():
    from chatforge.evaluation.crossfit import flag_fit_apply, policy_fit_apply
    from chatforge.evaluation.metrics import DEFAULT_OOS_GRID
    from chatforge.oos import OOSPolicy

    rng = np.random.default_rng(1)
    labels, y = ["a", "b", OOS], ["a"] * 15 + ["b"] * 15 + [OOS] * 10
    probs = rng.dirichlet([1, 1, 1], size=len(y))
    p_oos = np.clip(0.4 * np.array([v == OOS for v in y]) + 0.6 * rng.random(len(y)), 0, 1)
    policy = OOSPolicy(policy="binary")
    policy.oos_probability = lambda texts: p_oos  # a detector stand-in: P(oos) per text
    texts = [f"t{i}" for i in range(len(y))]
    main = apply_oos_threshold(probs, labels, 0.0, OOS)
    got = cross_fit(y, policy_fit_apply(policy, [probs], labels, texts, y, max_in_scope_drop=0.0), OOS, 4, 3)
    unbounded = cross_fit(y, flag_fit_apply(main, p_oos, y, OOS, None, grid=DEFAULT_OOS_GRID), OOS, 4, 3)
    bounded = cross_fit(y, flag_fit_apply(main, p_oos, y, OOS, 0.0, grid=DEFAULT_OOS_GRID), OOS, 4, 3)
    assert got == unbounded and got != bounded
