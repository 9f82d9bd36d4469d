"""data.dev_fraction: a development test held out of a predefined (CLINC150) split's train lists."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tests.test_oos import intent_cfg
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import ConfigError, load_config, validate_config
from chatforge.data import Example
from chatforge.data.splits import hold_out
from chatforge.evaluation.compare import build_leaderboard, collect_runs
from chatforge.evaluation.evaluate import EvaluationError, evaluate_bundle
from chatforge.training.run import load_splits, run_experiment

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, dev_fraction=0.25, seed=0, dev_seed=0, **oos):
    tree = intent_cfg(tmp_path, oos=oos or None)
    tree["seed"] = seed
    tree["data"].update(dev_fraction=dev_fraction, dev_seed=dev_seed)
    return validate_config(tree)


def test_dev_split_is_stratified_disjoint_and_fixed_by_dev_seed(tmp_path):
    train, valid, dev, _ = load_splits(_cfg(tmp_path))
    # 12 per intent and 8 oos in the train lists: a quarter of each label is held out
    assert Counter(e.label for e in dev) == {"weather": 3, "flight": 3, "music": 3, "oos": 2}
    assert Counter(e.label for e in train) == {"weather": 9, "flight": 9, "music": 9, "oos": 6}
    assert not {e.text for e in dev} & {e.text for e in train}
    assert len(valid) == 3 * 6 + 6  # the val lists are untouched
    # the run's seed (a Transformer seed of an ensemble) does not move it; dev_seed does
    _, _, dev_seed1, _ = load_splits(_cfg(tmp_path, seed=1))
    assert [e.text for e in dev_seed1] == [e.text for e in dev]
    _, _, other, _ = load_splits(_cfg(tmp_path, dev_seed=1))
    assert [e.text for e in other] != [e.text for e in dev]
    # without it, nothing is held out
    train0, _, dev0, _ = load_splits(_cfg(tmp_path, dev_fraction=0.0))
    assert dev0 == [] and len(train0) == len(train) + len(dev)


def test_dev_fraction_needs_a_predefined_split(tmp_path):
    tree = intent_cfg(tmp_path)
    tree["data"].update(split="random", dev_fraction=0.2)
    with pytest.raises(ConfigError, match="dev_fraction.*test_fraction"):
        validate_config(tree)


@pytest.fixture(scope="module")
def dev_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dev")
    return run_experiment(_cfg(tmp, policy="threshold"), run_dir=tmp / "run")


def test_run_reports_dev_beside_valid_and_evaluate_agrees(dev_run):
    m = dev_run.metrics
    assert m["dev_examples"] == 11 and m["train_examples"] == 33 and "test_examples" not in m
    for split in ("valid", "dev"):
        assert 0.0 <= m[f"{split}_in_scope_accuracy"] <= 1.0 and 0.0 <= m[f"{split}_oos_recall"] <= 1.0
    res = evaluate_bundle(dev_run.bundle_dir, split="dev", track=False)
    s = res.summary
    assert s["split"] == "dev" and s["n"] == 11 and res.out_dir == dev_run.run_dir / "eval" / "intents-dev"
    # the bundle's served answers (its threshold included) give the run's dev figures
    assert s["metrics"]["in_scope_accuracy"] == pytest.approx(m["dev_in_scope_accuracy"])
    assert s["metrics"]["oos_recall"] == pytest.approx(m["dev_oos_recall"])
    assert "oos_policy_fitted_on_this_split" not in s["metrics"]  # nothing was fitted on dev


def test_compare_has_a_dev_column(dev_run):
    evaluate_bundle(dev_run.bundle_dir, split="dev", track=False)
    evaluate_bundle(dev_run.bundle_dir, track=False)
    lb = build_leaderboard(collect_runs([dev_run.run_dir]), metric="in_scope_accuracy")
    assert {"dev_in_scope_accuracy", "dev_oos_recall"} <= set(lb.columns)
    row = lb.rows[0]
    assert lb.split == "val+oos_val"  # dev is a column beside the split ranked on, not the split
    ev = json.loads((dev_run.run_dir / "eval" / "intents-dev" / "evaluation.json").read_text())
    assert row["dev_oos_recall"] == pytest.approx(ev["metrics"]["oos_recall"])


def test_evaluate_split_dev_errors_name_the_fix(tmp_path):
    res = run_experiment(_cfg(tmp_path, dev_fraction=0.0), run_dir=tmp_path / "r")
    with pytest.raises(EvaluationError, match="dev_fraction is 0"):
        evaluate_bundle(res.bundle_dir, split="dev", track=False)
    r = CliRunner().invoke(app, ["evaluate", str(res.bundle_dir), "--split", "dev"])
    assert r.exit_code != 0 and "dev_fraction" in r.output


PAIRS = ["book a flight to paris", "what is the weather in rome", "play some jazz music", "set an alarm for six",
         "how much is my card balance", "translate hello into french", "order a large pizza", "call my mother now",
         "turn off the kitchen lights", "when does the bank open"]


def test_grouped_hold_out_keeps_near_duplicates_together():
    examples = [Example(t + suffix, label="x") for t in PAIRS for suffix in ("", " please")]
    kept, held = hold_out(examples, 0.3, seed=0, group_similarity=0.7)
    assert len(held) == 6 and len(kept) == 14  # three whole pairs
    held_roots = {e.text.removesuffix(" please") for e in held}
    assert not held_roots & {e.text.removesuffix(" please") for e in kept}
    # one by one, a pair is split somewhere: the held-out half has its sibling in training
    kept1, held1 = hold_out(examples, 0.3, seed=0)
    assert {e.text.removesuffix(" please") for e in held1} & {e.text.removesuffix(" please") for e in kept1}
    assert hold_out(examples, 0.3, seed=0, group_similarity=0.7) == (kept, held)  # deterministic


def test_group_similarity_needs_a_dev_fraction(tmp_path):
    tree = intent_cfg(tmp_path)
    tree["data"]["dev_group_similarity"] = 0.85
    with pytest.raises(ConfigError, match="dev_group_similarity.*dev_fraction is 0"):
        validate_config(tree)


def test_ensemble_members_must_hold_out_the_same_dev_split(tmp_path):
    held = run_experiment(_cfg(tmp_path), run_dir=tmp_path / "held")
    seen = run_experiment(_cfg(tmp_path, dev_fraction=0.0), run_dir=tmp_path / "seen")
    other = run_experiment(_cfg(tmp_path, dev_seed=1), run_dir=tmp_path / "other")

    def ensemble(*members):
        tree = intent_cfg(tmp_path, family="ensemble", members=[str(m.run_dir) for m in members])
        tree["data"].update(dev_fraction=0.25, dev_seed=0)
        return validate_config(tree)

    for bad in (seen, other):
        with pytest.raises(ConfigError, match="has seen the ensemble's dev examples"):
            run_experiment(ensemble(held, bad), run_dir=tmp_path / "ens-bad")
    ok = run_experiment(ensemble(held, held), run_dir=tmp_path / "ens")
    assert ok.metrics["dev_in_scope_accuracy"] == pytest.approx(held.metrics["dev_in_scope_accuracy"])


def test_tail_hold_out_takes_each_labels_last_examples_in_file_order():
    # two labels interleaved; each label's last 30 % in input order is held out, whatever the seed
    examples = [Example(f"{lab} query {i}", label=lab) for i in range(10) for lab in ("a", "b")]
    kept, held = hold_out(examples, 0.3, order="tail")
    assert [e.text for e in held] == [f"{lab} query {i}" for i in (7, 8, 9) for lab in ("a", "b")]
    assert len(kept) == 14 and not {e.text for e in kept} & {e.text for e in held}
    assert hold_out(examples, 0.3, seed=5, order="tail") == (kept, held)  # dev_seed plays no part
    # an exact twin earlier in the list goes with the held-out copy: a duplicate never straddles the cut
    twins = [Example("same", label="a"), *[Example(f"q{i}", label="a") for i in range(8)], Example("same", label="a")]
    kept2, held2 = hold_out(twins, 0.2, order="tail")
    assert "same" not in {e.text for e in kept2}
    assert [e.text for e in held2] == ["same", "same"]
    with pytest.raises(Exception, match="hashed.*tail"):
        hold_out(examples, 0.3, order="random")


def test_dev_split_tail_in_config_reads_file_order(tmp_path):
    cfg = _cfg(tmp_path)

    def with_data(**data):
        return validate_config({**cfg.model_dump(mode="json"), "data": {**cfg.data.model_dump(mode="json"), **data}})

    _, _, dev, _ = load_splits(with_data(dev_split="tail"))
    everything = load_splits(with_data(dev_fraction=0.0))[0]
    # the held-out texts are each label's last ones in the file's train lists
    for lab in {e.label for e in everything}:
        ordered = [e.text for e in everything if e.label == lab]
        got = [e.text for e in dev if e.label == lab]
        assert got and got == ordered[len(ordered) - len(got):]
    hashed = load_splits(cfg)[2]
    assert {e.text for e in hashed} != {e.text for e in dev}
    tree = intent_cfg(tmp_path)
    tree["data"].update(dev_fraction=0.2, dev_split="tail", dev_group_similarity=0.85)
    with pytest.raises(ConfigError, match="drop one of the two"):
        validate_config(tree)


def test_a_tail_config_trains_on_everything_with_dev_fraction_0():
    """`--set data.dev_fraction=0` on a shipped CLINC150 config (which sets dev_split: tail) is how a model is
    trained on all of train + oos_train for release: no error, no dev split."""
    cfg = load_config(ROOT / "configs" / "linear_svm_clinc150.yaml", ["data.dev_fraction=0"])
    assert cfg.data.dev_split == "tail" and cfg.data.dev_fraction == 0
    for name in ("clinc150_transformer_oe.yaml", "ensemble_clinc150.yaml"):
        assert load_config(ROOT / "configs" / name, ["data.dev_fraction=0"]).data.dev_fraction == 0


def test_ensemble_refuses_a_member_with_another_dev_split_order(tmp_path):
    held = run_experiment(_cfg(tmp_path), run_dir=tmp_path / "held")
    tree = intent_cfg(tmp_path, family="ensemble", members=[str(held.run_dir)] * 2)
    tree["data"].update(dev_fraction=0.25, dev_seed=0, dev_split="tail")
    with pytest.raises(ConfigError, match="has seen the ensemble's dev examples"):
        run_experiment(validate_config(tree), run_dir=tmp_path / "ens-bad")
