"""Knowledge distillation into torch classifiers (Hinton et al. 2015): ``train.distill_from`` and its weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.test_oos import intent_cfg, write_intent_data
from tests.training.test_outlier_exposure import _Rows, _Toy
from torch.utils.data import DataLoader

from chatforge.config import ConfigError, TrainConfig, validate_config
from chatforge.data import Example
from chatforge.inference import load_model
from chatforge.tasks import (
    OUTLIER_MASK,
    TEACHER_PROBS,
    OutlierExposureDataset,
    SoftTargetDataset,
    TaskDataError,
    TaskSpec,
    distillation_loss,
    make_dataset,
)
from chatforge.tokenizer import Tokenizer
from chatforge.training.run import run_experiment
from chatforge.training.trainer import Trainer

TINY = {"d_model": 32, "n_heads": 2, "num_encoder_layers": 1, "d_ff": 64, "dropout": 0.0}
TRAIN = {"epochs": 20, "batch_size": 16, "lr": 5e-3, "warmup_ratio": 0.0, "num_threads": 1, "device": "cpu"}


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_loss_is_t_squared_kl_to_the_tempered_teacher(temperature):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g) * 2
    q = torch.softmax(torch.randn(6, 5, generator=g) * 3, -1)
    # reference: torch's own KL divergence between softmax(log q / T) and softmax(z / T)
    ref = F.kl_div(F.log_softmax(z / temperature, -1), F.log_softmax(torch.log(q) / temperature, -1),
                   reduction="batchmean", log_target=True) * temperature**2
    assert torch.allclose(distillation_loss(z, q, temperature), ref, atol=1e-6)
    # zero exactly when the student's logits are the teacher's (up to a constant per row)
    assert float(distillation_loss(torch.log(q) + 3.0, q, temperature)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(z, q, temperature)) > 1e-3


def test_soft_targets_follow_their_rows_through_any_order_and_through_outlier_exposure():
    g = torch.Generator().manual_seed(0)
    inner = _Rows(torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 0, 1]))
    outliers = _Rows(torch.randn(3, 4, generator=g), torch.zeros(3))
    probs = torch.softmax(torch.randn(8, 3, generator=g), -1)
    ds = SoftTargetDataset(OutlierExposureDataset(inner, outliers), probs)
    order = [6, 0, 3, 7, 1]
    batch = ds.collate([ds[i] for i in order])
    assert torch.equal(batch[TEACHER_PROBS], probs[order])
    assert batch[OUTLIER_MASK].tolist() == [True, False, False, True, False]
    assert torch.equal(batch["x"][1], inner.x[0]) and torch.equal(batch["x"][0], outliers.x[1])
    with pytest.raises(TaskDataError, match=r"one row per training row: shape \(5, C\)"):
        SoftTargetDataset(inner, probs)


def test_trainer_mixes_the_distillation_term_into_labelled_rows_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g)
    inner, outliers = _Rows(x, x[:, :3].argmax(-1)), _Rows(torch.randn(4, 4, generator=g) * 4, torch.zeros(4))
    q = torch.softmax(torch.randn(8, 3, generator=g) * 2, -1)
    # outlier rows get a target that would give a large KD term if it were (wrongly) applied to them
    ds = SoftTargetDataset(OutlierExposureDataset(inner, outliers), torch.cat([q, torch.eye(3)[[0, 0, 0, 0]]]))
    dl = DataLoader(ds, batch_size=12, shuffle=False, collate_fn=ds.collate)
    cfg = TrainConfig(epochs=1, batch_size=12, lr=1e-12, warmup_ratio=0.0, schedule="constant", device="cpu",
                      outlier_weight=2.0, grad_clip=None, distill_weight=0.25, distill_temperature=2.0)
    model = _Toy()
    logs = Trainer(model, dl, None, cfg, device=torch.device("cpu")).fit().history[0]
    with torch.no_grad():
        kd = float(distillation_loss(model.lin(x), q, 2.0))
        ce = float(F.cross_entropy(model.lin(x), inner.y))
        from chatforge.tasks import outlier_exposure_loss
        oe = float(outlier_exposure_loss(model.lin(outliers.x)))
    assert logs["train_distillation_loss"] == pytest.approx(kd, rel=1e-5)
    assert logs["train_loss"] == pytest.approx(0.75 * ce + 0.25 * kd + 2.0 * oe, rel=1e-5)


def _swapped_data(path, source):
    """The intent file with weather and flight swapped: a teacher trained on it says 'flight' to weather talk."""
    data = json.loads(source.read_text())
    swap = {"weather": "flight", "flight": "weather"}
    for key in ("train", "val"):
        data[key] = [[t, swap.get(y, y)] for t, y in data[key]]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _predict(bundle_dir, texts):
    return [p.label for p in load_model(bundle_dir, "intents").classify(texts)]


def test_the_student_learns_the_teachers_answers_not_only_the_labels(tmp_path):
    # Teacher: a linear model taught that weather talk is 'flight' and the reverse. A student that only
    # distils (distill_weight 1) answers as the teacher does, though its own data says otherwise; a student
    # without the teacher answers as its data says. An implementation that drops the term fails the first.
    source = write_intent_data(tmp_path / "source.json", n_train=30, n_val=8)
    teacher_tree = intent_cfg(tmp_path, family="linear", name="teacher")
    teacher_tree["data"]["path"] = str(_swapped_data(tmp_path / "swapped.json", source))
    teacher = run_experiment(validate_config(teacher_tree), run_dir=tmp_path / "teacher")
    # The students validate on music only: the best epoch (the weights kept) is then chosen on examples where
    # teacher and labels agree, not against the teacher on weather and flight.
    data = json.loads(source.read_text())
    probe = [(t, y) for t, y in data["val"] if y in ("weather", "flight")]
    data["val"] = [[t, y] for t, y in data["val"] if y == "music"]
    (tmp_path / "neutral.json").write_text(json.dumps(data), encoding="utf-8")

    def student(name, **train):
        tree = intent_cfg(tmp_path, family="transformer", name=name, **TINY)
        tree["data"]["path"] = str(tmp_path / "neutral.json")
        tree["tokenizer"] = {"vocab_size": 120, "on_vocab_too_large": "lower"}
        tree["train"] = {**TRAIN, **train}
        return run_experiment(validate_config(tree), run_dir=tmp_path / name)

    texts, labels = [t for t, _ in probe], [y for _, y in probe]
    swap = {"weather": "flight", "flight": "weather"}
    want_teacher = [swap[y] for y in labels]
    plain = student("plain")
    distilled = student("distilled", distill_from=str(tmp_path / "teacher"), distill_weight=1.0,
                        distill_temperature=1.0)
    assert np.mean([p == y for p, y in zip(_predict(teacher.bundle_dir, texts), want_teacher, strict=True)]) >= 0.8
    assert np.mean([p == y for p, y in zip(_predict(plain.bundle_dir, texts), labels, strict=True)]) >= 0.8
    assert np.mean([p == y for p, y in zip(_predict(distilled.bundle_dir, texts), want_teacher, strict=True)]) >= 0.8
    hist = distilled.metrics["history"]
    assert all("train_distillation_loss" in h for h in hist) and "train_distillation_loss" not in \
        plain.metrics["history"][0]
    assert hist[-1]["train_distillation_loss"] < hist[0]["train_distillation_loss"]


def test_a_teacher_that_saw_the_held_out_split_is_refused_before_training(tmp_path):
    def linear(name, **data):
        tree = intent_cfg(tmp_path, family="linear", name=name)
        tree["data"].update(data)
        return run_experiment(validate_config(tree), run_dir=tmp_path / name)

    linear("same", dev_fraction=0.3)
    linear("other", dev_fraction=0.3, dev_seed=1)
    linear("none")

    def student(teacher):
        tree = intent_cfg(tmp_path, family="transformer", name="student", **TINY)
        tree["data"]["dev_fraction"] = 0.3
        tree["tokenizer"] = {"vocab_size": 120, "on_vocab_too_large": "lower"}
        tree["train"] = {**TRAIN, "epochs": 1, "distill_from": str(tmp_path / teacher)}
        return run_experiment(validate_config(tree), run_dir=tmp_path / f"student-{teacher}")

    for leaky in ("other", "none"):
        with pytest.raises(ConfigError, match="different held-out split"):
            student(leaky)
        assert not (tmp_path / f"student-{leaky}" / "bundle").exists()
    assert (student("same").bundle_dir / "metadata.json").is_file()



def test_distillation_config_is_refused_where_it_means_nothing(tmp_path):
    tree = intent_cfg(tmp_path, family="linear")
    tree["train"] = {"distill_from": "runs/teacher"}
    with pytest.raises(ConfigError, match="distill_from"):
        validate_config(tree)
    gen = {"name": "g", "data": {"path": "sample"}, "model": {"family": "transformer", "task": "generation"},
           "train": {"distill_from": "runs/teacher"}}
    with pytest.raises(ConfigError, match="task 'generation'"):
        validate_config(gen)
    for key, bad in (("distill_weight", 0), ("distill_weight", 1.5), ("distill_temperature", 0)):
        tree = intent_cfg(tmp_path, family="transformer")
        tree["train"] = {key: bad}
        with pytest.raises(ConfigError, match=key):
            validate_config(tree)


def test_a_missing_teacher_or_one_with_other_labels_is_named(tmp_path):
    tree = intent_cfg(tmp_path, family="transformer", name="s", **TINY)
    tree["tokenizer"] = {"vocab_size": 120, "on_vocab_too_large": "lower"}
    tree["train"] = {**TRAIN, "epochs": 1, "distill_from": str(tmp_path / "absent")}
    with pytest.raises(ConfigError, match="absent does not exist"):
        run_experiment(validate_config(tree), run_dir=tmp_path / "s1")
    data = json.loads(write_intent_data(tmp_path / "fewer.json").read_text())
    data["train"] = [[t, y] for t, y in data["train"] if y != "music"]
    data["val"] = [[t, y] for t, y in data["val"] if y != "music"]
    (tmp_path / "fewer.json").write_text(json.dumps(data), encoding="utf-8")
    teacher = intent_cfg(tmp_path, family="linear", name="t")
    teacher["data"]["path"] = str(tmp_path / "fewer.json")
    run_experiment(validate_config(teacher), run_dir=tmp_path / "t")
    write_intent_data(tmp_path / "intents.json")
    tree["train"]["distill_from"] = str(tmp_path / "t")
    with pytest.raises(ConfigError, match=r"labels only here \['music'\]"):
        run_experiment(validate_config(tree), run_dir=tmp_path / "s2")


def test_teacher_probs_are_reordered_to_the_students_labels(tmp_path):
    from chatforge.training.distill import load_teacher, teacher_probs
    run_experiment(validate_config(intent_cfg(tmp_path, family="linear", name="t")), run_dir=tmp_path / "t")
    teacher = load_teacher(str(tmp_path / "t"))
    texts = ["what is the weather forecast", "book a flight ticket"]
    own = np.asarray(teacher.predict_proba(texts))
    order = list(reversed(teacher.labels))
    p = teacher_probs(teacher, texts, order).numpy()
    assert np.allclose(p, own[:, ::-1] / own.sum(1, keepdims=True), atol=1e-6)
    assert [order[i] for i in p.argmax(1)] == ["weather", "flight"]


def test_soft_target_rows_are_the_teachers_on_each_training_text(tmp_path):
    # the dataset index of a row and the text it was computed on must be the same example
    tok = Tokenizer.train(["what is the weather", "book a flight now", "play a song"] * 20, vocab_size=60,
                          on_vocab_too_large="lower", character_coverage=1.0)
    spec = TaskSpec("classification", "transformer", 16, 16, ["flight", "music", "weather"])
    train = [Example("what is the weather", label="weather"), Example("book a flight now", label="flight")]
    probs = torch.tensor([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    ds = SoftTargetDataset(make_dataset(spec, train, tok), probs)
    batch = ds.collate([ds[1], ds[0]])
    assert batch["labels"].tolist() == [0, 2] and torch.equal(batch[TEACHER_PROBS], probs[[1, 0]])


def _linear_fold(tmp_path, name, fold=None, folds=3, seed=0, **data):
    tree = intent_cfg(tmp_path, family="linear", name=name)
    tree["data"].update(dev_fraction=0.25, **data)
    if fold is not None:
        tree["data"]["crossfit_fold"] = {"folds": folds, "fold": fold, "seed": seed}
    return run_experiment(validate_config(tree), run_dir=tmp_path / name)


def _student_tree(tmp_path, teachers, **train):
    tree = intent_cfg(tmp_path, family="transformer", name="student", **TINY)
    tree["data"]["dev_fraction"] = 0.25
    tree["tokenizer"] = {"vocab_size": 120, "on_vocab_too_large": "lower"}
    tree["train"] = {**TRAIN, "epochs": 1, "distill_from": [str(tmp_path / t) for t in teachers], **train}
    return validate_config(tree)


def test_fold_ids_deal_each_label_evenly_and_keep_duplicates_together():
    from chatforge.data.splits import fold_ids

    examples = [Example(f"{lab} text {i}", label=lab) for lab in "ab" for i in range(9)]
    examples.append(Example("a text 0", label="a"))  # an exact duplicate
    ids = fold_ids(examples, 3, seed=0)
    for lab in "ab":
        counts = np.bincount([f for e, f in zip(examples, ids, strict=True) if e.label == lab], minlength=3)
        assert counts.max() - counts.min() <= 1 + (lab == "a")  # the duplicate rides with its twin
    assert ids[0] == ids[-1]
    # the fold is a function of the example, not of its position
    order = list(reversed(range(len(examples))))
    assert [ids[i] for i in order] == fold_ids([examples[i] for i in order], 3, seed=0)
    assert fold_ids(examples, 3, seed=1) != ids


def test_crossfit_fold_leaves_that_fold_out_of_training(tmp_path):
    from chatforge.data.splits import fold_ids
    from chatforge.training.run import load_splits

    tree = intent_cfg(tmp_path, family="linear")
    tree["data"]["dev_fraction"] = 0.25
    full, valid, dev, _ = load_splits(validate_config(tree))
    ids = fold_ids(full, 3, 0)
    tree["data"]["crossfit_fold"] = {"folds": 3, "fold": 1}
    kept, valid1, dev1, _ = load_splits(validate_config(tree))
    assert [e.text for e in kept] == [e.text for e, f in zip(full, ids, strict=True) if f != 1]
    assert (valid1, dev1) == (valid, dev)  # val and dev are untouched
    tree["data"]["crossfit_fold"] = {"folds": 3, "fold": 3}
    with pytest.raises(ConfigError, match=r"fold=3 must be in \[0, folds=3\)"):
        validate_config(tree)


def test_a_crossfitted_teacher_gives_each_example_the_targets_of_the_run_that_never_saw_it(tmp_path, monkeypatch):
    import chatforge.training.run as run_mod
    from chatforge.training.run import load_splits

    for i in range(3):
        _linear_fold(tmp_path, f"t{i}", fold=i)
    calls = []
    real = run_mod.teacher_probs

    def spy(teacher, texts, labels, **kw):
        calls.append((teacher, list(texts)))
        return real(teacher, texts, labels, **kw)

    monkeypatch.setattr(run_mod, "teacher_probs", spy)
    cfg = _student_tree(tmp_path, ["t0", "t1", "t2"])
    res = run_experiment(cfg, run_dir=tmp_path / "student")
    assert (res.bundle_dir / "metadata.json").is_file()
    student_train = {e.text for e in load_splits(cfg)[0]}
    assert len(calls) == 3
    covered = []
    for i, (teacher, texts) in enumerate(calls):
        assert teacher.config.data.crossfit_fold.fold == i
        seen = {e.text for e in load_splits(teacher.config)[0]}
        assert texts and not set(texts) & seen  # no example is scored by a teacher that trained on it
        covered += texts
    assert sorted(covered) == sorted(e.text for e in load_splits(cfg)[0]) and set(covered) == student_train


def test_a_crossfitted_teacher_out_of_order_or_with_other_folds_is_refused(tmp_path):
    for i in range(3):
        _linear_fold(tmp_path, f"t{i}", fold=i)
    _linear_fold(tmp_path, "seed1", fold=2, seed=1)
    _linear_fold(tmp_path, "plain")
    for teachers, match in ((["t1", "t0", "t2"], "entry 0 .* must be trained with data.crossfit_fold"),
                            (["t0", "t1", "plain"], "entry 2"),
                            (["t0", "t1", "seed1"], "different data.crossfit_fold seeds"),
                            (["t0", "t1"], "entry 0 .*folds: 2")):
        with pytest.raises(ConfigError, match=match):
            run_experiment(_student_tree(tmp_path, teachers), run_dir=tmp_path / "s")
        assert not (tmp_path / "s" / "bundle").exists()
    with pytest.raises(ConfigError, match="needs at least 2"):
        _student_tree(tmp_path, ["t0"])
    tree = _student_tree(tmp_path, ["t0", "t1", "t2"]).to_dict()
    tree["data"]["crossfit_fold"] = {"folds": 3, "fold": 0}
    with pytest.raises(ConfigError, match="leaves a fold out itself"):
        validate_config(tree)
