"""Subword regularization (Kudo 2018): ``train.subword_alpha`` re-segments the training texts every epoch by sampling
SentencePiece segmentations, seeded by (seed, epoch); validation, evaluation and serving keep the one best."""

from __future__ import annotations

import pytest
import torch
from tests.test_bundle import tiny_cfg
from tests.test_oos import intent_cfg
from tests.training.test_outlier_exposure import _outlier_file

from chatforge.config import ConfigError, validate_config
from chatforge.data import Example
from chatforge.tasks import (
    ClassificationDataset,
    OutlierExposureDataset,
    ResegmentedDataset,
    SoftTargetDataset,
    SubwordSampler,
    TaskDataError,
    TaskSpec,
    make_dataset,
    seed_subword_sampling,
    with_outliers,
)
from chatforge.tokenizer import Tokenizer
from chatforge.training.run import run_experiment

TEXTS = ["how do i say subway in english", "what is my credit score", "transfer money to my savings account",
         "book a table for two tonight", "what time is it in tokyo", "remind me to call my mother tomorrow"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=120, on_vocab_too_large="lower", character_coverage=1.0)


def test_sampled_segmentations_vary_decode_to_the_text_and_repeat_with_the_seed(tok):
    sampler = SubwordSampler(tok, alpha=0.1)
    text = TEXTS[0]
    seed_subword_sampling(0, 0)
    draws = [sampler.encode(text) for _ in range(20)]
    assert len({tuple(d) for d in draws}) > 1  # not one fixed segmentation
    assert all(tok.decode(d) == text for d in draws)
    assert tok.encode(text) in draws or all(len(d) >= len(tok.encode(text)) for d in draws)
    seed_subword_sampling(0, 0)
    assert [sampler.encode(text) for _ in range(20)] == draws  # a function of the seed
    seed_subword_sampling(0, 1)
    assert [sampler.encode(text) for _ in range(20)] != draws
    assert sampler.vocab_size == tok.vocab_size and sampler.pad_id == tok.pad_id  # the rest is the tokenizer's


def test_a_byte_tokenizer_has_nothing_to_sample():
    from chatforge.tokenizer import ByteTokenizer

    with pytest.raises(TaskDataError, match="SentencePiece tokenizer"):
        SubwordSampler(ByteTokenizer(), alpha=0.1)


def test_the_training_set_is_resegmented_each_epoch_with_rows_and_labels_in_place(tok):
    examples = [Example(text=t, label=f"l{i % 6}") for i, t in enumerate(TEXTS)]
    spec = TaskSpec("classification", "transformer", 64, 64, sorted({e.label for e in examples}))
    ds = ResegmentedDataset(lambda t: make_dataset(spec, examples, t), tok, alpha=0.1, nbest=-1, seed=3)
    assert isinstance(ds.current, ClassificationDataset) and len(ds) == len(examples)
    epoch0 = [ds[i] for i in range(len(ds))]
    ds.set_epoch(0)  # the same epoch again: unchanged
    assert [ds[i] for i in range(len(ds))] == epoch0
    ds.set_epoch(1)
    epoch1 = [ds[i] for i in range(len(ds))]
    assert epoch1 != epoch0
    assert [y for _, y in epoch1] == [y for _, y in epoch0]  # labels stay with their rows
    assert all(tok.decode(ids) == e.text for (ids, _), e in zip(epoch1, examples, strict=True))
    again = ResegmentedDataset(lambda t: make_dataset(spec, examples, t), tok, alpha=0.1, nbest=-1, seed=3)
    again.set_epoch(1)
    assert [again[i] for i in range(len(again))] == epoch1  # (seed, epoch) decides, as on resume
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].tolist() == [epoch1[0][1], epoch1[1][1]]
    # A sampled segmentation is longer than the best one; the task's max_source_len still bounds every row.
    short = TaskSpec("classification", "transformer", 8, 8, spec.labels)
    capped = ResegmentedDataset(lambda t: make_dataset(short, examples, t), tok, alpha=0.1, nbest=-1, seed=3)
    assert max(len(capped[i][0]) for i in range(len(capped))) == 8


def test_outliers_and_soft_targets_wrap_a_resegmented_set(tok):
    examples = [Example(text=t, label=f"l{i % 6}") for i, t in enumerate(TEXTS[:12])]
    spec = TaskSpec("classification", "transformer", 24, 24, sorted({e.label for e in examples}))
    outliers = ["a river and an island", "the painter of the empire"]
    ds = ResegmentedDataset(lambda t: with_outliers(spec, make_dataset(spec, examples, t), outliers, t), tok,
                            alpha=0.1, nbest=-1, seed=0)
    assert isinstance(ds.current, OutlierExposureDataset) and len(ds) == 14
    soft = SoftTargetDataset(ds, torch.full((14, 6), 1 / 6))
    before = soft[13]
    for epoch in range(1, 6):  # SoftTargetDataset passes the epoch on
        soft.set_epoch(epoch)
        assert ds.epoch == epoch
    assert soft[13][1] == before[1] == 13


def test_config_checks_where_sampling_applies(tmp_path):
    tree = intent_cfg(tmp_path, family="linear")
    tree["train"] = {"subword_alpha": 0.2}
    with pytest.raises(ConfigError, match="family 'linear' is not one"):
        validate_config(tree)
    tree = intent_cfg(tmp_path, family="transformer")
    tree["tokenizer"] = {"kind": "byte"}
    tree["train"] = {"subword_alpha": 0.2}
    with pytest.raises(ConfigError, match="tokenizer.kind 'byte' has one segmentation per text"):
        validate_config(tree)
    tree = intent_cfg(tmp_path, family="transformer")
    tree["train"] = {"subword_alpha": 0.2, "subword_nbest": 1}
    with pytest.raises(ConfigError, match="subword_nbest=1 leaves nothing to sample"):
        validate_config(tree)
    tree["train"] = {"subword_alpha": 1.5}
    with pytest.raises(ConfigError, match="subword_alpha"):
        validate_config(tree)
    tree["train"] = {"subword_alpha": 0.2}
    assert validate_config(tree).train.subword_alpha == 0.2


def test_training_resamples_every_epoch_and_is_reproducible(tmp_path, monkeypatch):
    """Fails on the old code, which has no such key (and trains on one segmentation)."""
    calls: list[int] = []
    real = ResegmentedDataset.set_epoch
    monkeypatch.setattr(ResegmentedDataset, "set_epoch", lambda self, e: calls.append(e) or real(self, e))

    def run(name, **train):
        cfg = validate_config(tiny_cfg("classification", tmp_path / name, epochs=3, max_steps=None, **train))
        return run_experiment(cfg, run_dir=tmp_path / name / "run")

    a = run("a", subword_alpha=0.1)
    assert 0 in calls and {1, 2} <= set(calls)  # the Trainer asked for each epoch's segmentation
    b = run("b", subword_alpha=0.1)
    plain = run("plain")
    assert a.metrics["history"] == b.metrics["history"]  # same seed: the same draws, the same run
    assert a.metrics["history"][-1]["train_loss"] != plain.metrics["history"][-1]["train_loss"]


def test_outlier_exposure_runs_with_subword_regularization(tmp_path):
    path, _ = _outlier_file(tmp_path / "wiki.txt")
    tree = intent_cfg(tmp_path, family="transformer", d_model=16, n_heads=2, num_encoder_layers=1, d_ff=32)
    tree["data"]["outliers"] = str(path)
    tree["tokenizer"] = {"vocab_size": 80, "on_vocab_too_large": "lower"}
    tree["train"] = {"epochs": 2, "batch_size": 16, "subword_alpha": 0.2}
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "run")
    assert len(res.metrics["history"]) == 2 and res.metrics["valid_accuracy"] > 0
