"""benchmarks/clinc150_results.py as a user meets it: skips by name, outputs outside the tracked tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.benchmarks.conftest import load

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load("clinc150_results")


def _keys(script, skip):
    return [key for _, key, _, _ in script.plan_runs(skip, [0, 1], 12, 6, 0.2)]


def test_every_model_can_be_skipped_by_name(script):
    assert _keys(script, []) == ["linear", "svm", "svm-oe", "xgboost", "transformer-s0", "transformer-s1",
                                 "transformer-oe-s0", "bert", "gpt", "elmo"]
    assert _keys(script, ["bert", "gpt", "elmo", "xgboost", "svm-oe", "transformer-oe"]) == [
        "linear", "svm", "transformer-s0", "transformer-s1"]
    assert _keys(script, ["transformer", "linear", "svm"]) == ["svm-oe", "xgboost", "transformer-oe-s0", "bert",
                                                               "gpt", "elmo"]
    # --skip xgboost skips the ChatbotData XGBoost too; chatbot skips both ChatbotData runs
    assert script.chatbot_plan(["xgboost"]) == ["linear"]
    assert script.chatbot_plan(["chatbot"]) == [] and script.chatbot_plan([]) == ["linear", "xgboost"]


def test_the_outlier_exposure_transformer_reads_the_wiki_sentences_with_its_weight(script):
    plan = {key: overrides for _, key, _, overrides in script.plan_runs([], [0], 12, 6, 0.2, oe_seeds=[3])}
    oe = plan["transformer-oe-s3"]
    assert "seed=3" in oe and f"train.outlier_weight={script.OE_WEIGHT}" in oe
    assert any(o.startswith("data.outliers=") and o.endswith("all_wiki_sents.txt") for o in oe)
    assert not any(o.startswith("data.outliers=") for o in plan["transformer-s0"])
    assert script.parse_args([]).transformer_oe_seeds == [0]


def test_the_distilled_transformer_learns_from_the_ensemble_run_on_the_same_dev_split(script, tmp_path):
    plan = script.distill_plan([], [0, 2], tmp_path / "ensemble-oe-clinc150", 12, 0.2)
    assert [key for _, key, _, _ in plan] == ["transformer-distill-s0", "transformer-distill-s2"]
    over = plan[1][3]
    assert f"train.distill_from={tmp_path / 'ensemble-oe-clinc150'}" in over and "seed=2" in over
    assert {"data.dev_fraction=0.2", "data.dev_seed=0", f"train.outlier_weight={script.OE_WEIGHT}",
            f"train.distill_weight={script.DISTILL_WEIGHT}"} <= set(over)
    # no ensemble, no teacher; and it can be skipped by name
    assert script.distill_plan(["ensemble"], [0], tmp_path, 12, 0.2) == []
    assert script.distill_plan(["transformer-distill"], [0], tmp_path, 12, 0.2) == []
    assert script.parse_args([]).distill_seeds == [0] and script.parse_args(["--distill-seeds"]).distill_seeds == []


def test_the_ensemble_takes_one_kind_of_transformer(script):
    runs = dict.fromkeys(["linear", "svm", "svm-oe", "xgboost", "transformer-s0", "transformer-s1", "transformer-oe-s0",
                          "bert", "gpt", "elmo", "bert-pt"])
    assert script.ensemble_members(runs) == ["svm", "transformer-s0", "transformer-s1"]
    assert script.ensemble_members(runs, "oe") == ["svm", "transformer-oe-s0"]
    assert script.ensemble_members(runs, "oe", bert_pt=True) == ["svm", "transformer-oe-s0", "bert-pt"]


def test_the_pretrained_bert_is_pretrained_then_fine_tuned_on_the_same_dev_split(script, tmp_path):
    from chatforge.config import load_config

    plan = script.bert_pt_plan([], tmp_path, 0.2)
    assert [(c, d.name) for c, d, _ in plan] == [("bert_clinc150_pretrain.yaml", "bert-pt-pretrain-clinc150"),
                                                ("bert_clinc150_finetune.yaml", "bert-pt-clinc150")]
    (_, pre_dir, pre), (_, _, ft) = plan
    for over in (pre, ft):
        assert {"data.dev_fraction=0.2", "data.dev_seed=0"} <= set(over)
    assert any(o.startswith("data.unlabelled=") and o.endswith("all_wiki_sents.txt") for o in pre)
    assert f"model.init_from={pre_dir}" in ft and f"train.outlier_weight={script.OE_WEIGHT}" in ft
    # the overrides make valid configs (the script adds these two to every run)
    for config, _, over in plan:
        cfg = load_config(ROOT / "configs" / config, ["tracking.enabled=false", "oos.policy=train", *over])
        assert cfg.data.dev_fraction == 0.2
    assert script.bert_pt_plan(["bert-pt"], tmp_path, 0.2) == []
    assert "bert-pt" in script.SKIPPABLE


def test_a_run_folder_is_reused_only_for_the_same_configuration(script, tmp_path):
    from chatforge.config import load_config

    def cfg(*overrides):
        return load_config(ROOT / "configs" / "ensemble_clinc150.yaml", ["tracking.enabled=false", *overrides])

    base = cfg('model.members=["a", "b"]')
    assert script.changed_keys(base, cfg('model.members=["a", "b"]', "output.dir=elsewhere")) == []
    assert script.changed_keys(base, cfg('model.members=["a", "c"]')) == ["model.members"]
    assert script.changed_keys(base, cfg('model.members=["a", "b"]', "seed=3")) == ["seed"]
    # threads change speed, not the model; a path is the file it names, however it is spelt
    assert script.changed_keys(base, cfg('model.members=["a", "b"]', "train.num_threads=2")) == []
    same = f"data.path={ROOT.parent / 'shared' / 'data' / 'clinc150' / 'data_full_trainval.json'}"
    assert script.changed_keys(base, cfg('model.members=["a", "b"]', same)) == []
    assert script.changed_keys(base, cfg('model.members=["a", "b"]', "data.path=/elsewhere/x.json")) == ["data.path"]


def test_unknown_skip_name_is_refused_with_the_allowed_ones(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--skip", "xgb"])
    err = capsys.readouterr().err
    assert "xgb" in err and "xgboost" in err and "elmo" in err


def test_every_run_holds_out_the_same_dev_split(script):
    for _, _, _, overrides in script.plan_runs([], [0, 3], 12, 6, 0.2, 0.85, dev_split="hashed"):
        assert {"data.dev_fraction=0.2", "data.dev_seed=0", "data.dev_split=hashed",
                "data.dev_group_similarity=0.85"} <= set(overrides)
    for _, _, _, overrides in script.plan_runs([], [0], 12, 6, 0.2):
        assert {"data.dev_fraction=0.2", "data.dev_split=tail"} <= set(overrides)  # the default: file order
    assert script.dev_overrides(0.2, 0) == ["data.dev_fraction=0.2", "data.dev_seed=0", "data.dev_split=tail"]
    assert script.dev_overrides(0.0, 0) == ["data.dev_fraction=0.0", "data.dev_seed=0"]
    assert script.parse_args([]).dev_split == "tail"


def test_grouping_near_duplicates_needs_the_hashed_dev_split(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--dev-group-similarity", "0.85"])
    assert "--dev-split hashed" in capsys.readouterr().err
    assert script.parse_args(["--dev-group-similarity", "0.85", "--dev-split", "hashed"]).dev_group_similarity == 0.85


def test_results_go_beside_the_runs_unless_asked(script, tmp_path):
    args = script.parse_args(["--runs-dir", str(tmp_path / "r")])
    assert args.out == tmp_path / "r" / "results" / "clinc150"
    assert ROOT / "benchmarks" / "results" not in args.out.parents
    assert script.parse_args(["--out", "benchmarks/results/clinc150"]).out == Path("benchmarks/results/clinc150")


def test_held_out_metrics_fit_on_val_apply_to_dev(script):
    seen = {}

    def fit_apply(fit, app):
        seen["fit"], seen["app"] = list(fit), list(app)
        return ["oos", "a", "a"]

    y = ["a", "oos", "a", "oos", "a", "b"]
    m = script.held_out_metrics(fit_apply, y, n_val=3)
    assert seen == {"fit": [0, 1, 2], "app": [3, 4, 5]}
    assert m == {"in_scope_accuracy": 0.5, "oos_recall": 1.0}
    assert np.isclose(m["in_scope_accuracy"], 0.5)


def test_oos_scores_logits_are_the_ones_the_probabilities_come_from(tmp_path):
    from scipy.special import softmax
    from tests.test_oos import intent_cfg

    from chatforge.bundle import load_bundle
    from chatforge.config import validate_config
    from chatforge.training.run import run_experiment

    mod = load("clinc150_oos_scores")
    tree = intent_cfg(tmp_path, loss="svm", C=1.0, char_ngram_max=3)
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "r")
    bundle = load_bundle(res.bundle_dir)
    texts = ["please volcano the galaxy tax", "what is rain now forecast", "book a flight ticket"]
    np.testing.assert_allclose(softmax(mod.logits(bundle, texts), axis=1), bundle.predict_proba(texts), atol=1e-5)


def test_the_crossfitted_teacher_trains_each_fold_without_it_and_the_student_reads_them_in_order(script, tmp_path):
    from chatforge.config import load_config

    plan = script.crossfit_plan(5, 0, 2, 12, 0.2)
    assert len(plan) == 5
    for i, fold in enumerate(plan):
        assert [key for _, key, _, _ in fold] == [f"svm-cf{i}of5", f"transformer-oe-s2-cf{i}of5"]
        for _, _, config, over in fold:
            cfg = load_config(ROOT / "configs" / config, ["tracking.enabled=false", "oos.policy=train", *over])
            assert (cfg.data.crossfit_fold.folds, cfg.data.crossfit_fold.fold) == (5, i)
            assert cfg.data.dev_split == "tail" and cfg.data.dev_fraction == 0.2
        assert f"train.outlier_weight={script.OE_WEIGHT}" in fold[1][3] and "seed=2" in fold[1][3]
    teachers = [tmp_path / f"t{i}" for i in range(5)]
    over = script.student_overrides(0, 12, teachers, 0.2)
    cfg = load_config(ROOT / "configs" / "clinc150_transformer.yaml", ["tracking.enabled=false", *over])
    assert cfg.train.distill_from == [str(t) for t in teachers] and cfg.data.crossfit_fold is None
    one = script.student_overrides(0, 12, teachers[:1], 0.2)
    assert f"train.distill_from={teachers[0]}" in one
    assert script.parse_args([]).distill_crossfit == 0 and script.parse_args(["--distill-crossfit", "5"]).distill_crossfit == 5


@pytest.mark.parametrize("argv", [["--skip", "svm"], ["--skip", "transformer-oe"], ["--transformer-oe-seeds"],
                                  ["--skip", "transformer-distill"]])
def test_distill_crossfit_refuses_to_start_without_what_it_trains_on(script, capsys, argv):
    with pytest.raises(SystemExit):
        script.parse_args(["--distill-crossfit", "5", *argv])
    assert "--distill-crossfit 5 needs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--distill-crossfit", "1"])


def test_subword_regularization_reaches_every_transformer_run_and_nothing_else(script, tmp_path):
    from chatforge.config import load_config

    assert script.parse_args([]).transformer_subword_alpha is None  # the config's own value
    oe_alpha = load_config(ROOT / "configs" / "clinc150_transformer_oe.yaml").train.subword_alpha
    assert oe_alpha > 0
    # by default each run takes its config's: the outlier-exposure runs clinc150_transformer_oe.yaml's (the
    # ensemble's members), the plain ones none
    for kind, key, config, over in script.plan_runs([], [0], 12, 6, 0.2, oe_seeds=[1]):
        cfg = load_config(ROOT / "configs" / config, ["tracking.enabled=false", "oos.policy=train", *over])
        assert cfg.train.subword_alpha == (oe_alpha if kind == "transformer-oe" else 0.0), key
    assert "train.subword_alpha=0.0" in script.transformer_overrides(0, 12, subword_alpha=0.0)  # 0 turns it off
    plan = script.plan_runs([], [0], 12, 6, 0.2, oe_seeds=[1], subword_alpha=0.2)
    for kind, key, config, over in plan:
        cfg = load_config(ROOT / "configs" / config, ["tracking.enabled=false", "oos.policy=train", *over])
        assert (cfg.train.subword_alpha == 0.2) == kind.startswith("transformer"), key
    assert "train.subword_alpha=0.2" in script.distill_plan([], [0], tmp_path, 12, 0.2, subword_alpha=0.2)[0][3]
    assert all("train.subword_alpha=0.2" in fold[1][3] and "train.subword_alpha=0.2" not in fold[0][3]
               for fold in script.crossfit_plan(3, 0, 0, 12, 0.2, subword_alpha=0.2))
    assert "train.subword_alpha=0.2" in script.student_overrides(0, 12, [tmp_path], 0.2, subword_alpha=0.2)
