"""Outlier exposure for torch classifiers (Hendrycks et al. 2019): ``data.outliers`` + ``train.outlier_weight``."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.test_oos import FILLER, intent_cfg
from torch import nn
from torch.utils.data import DataLoader, Dataset

from chatforge.config import ConfigError, TrainConfig, validate_config
from chatforge.data import Example
from chatforge.data.readers import DataError
from chatforge.inference import load_model
from chatforge.models.outputs import ModelOutput
from chatforge.tasks import (
    IGNORE_INDEX,
    OUTLIER_MASK,
    OutlierExposureDataset,
    TaskDataError,
    TaskSpec,
    make_dataset,
    outlier_exposure_loss,
    with_outliers,
)
from chatforge.tokenizer import Tokenizer
from chatforge.training.run import run_experiment
from chatforge.training.trainer import Trainer

# Out-of-domain sentences: words that none of the tiny intents (or their oos examples) use.
OUTLIER_WORDS = ["history", "river", "novel", "painter", "empire", "chemistry", "orchestra", "island", "bridge"]


def _outlier_file(path, n: int = 60, seed: int = 1):
    rng = random.Random(seed)
    lines = [" ".join([rng.choice(FILLER), rng.choice(OUTLIER_WORDS), rng.choice(OUTLIER_WORDS)]) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


def test_outlier_exposure_loss_is_cross_entropy_to_the_uniform_distribution():
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 3
    uniform = torch.full_like(z, 1 / 7)
    assert torch.allclose(outlier_exposure_loss(z), F.cross_entropy(z, uniform), atol=1e-6)
    # its minimum, log C, is reached exactly at a flat distribution
    assert torch.allclose(outlier_exposure_loss(torch.zeros(2, 7)), torch.tensor(np.log(7.0), dtype=torch.float32))
    assert outlier_exposure_loss(z) > np.log(7.0)


def _tok(texts):
    return Tokenizer.train(texts, vocab_size=60, on_vocab_too_large="lower", character_coverage=1.0)


@pytest.mark.parametrize("family", ["transformer", "bert"])
def test_outliers_go_through_the_family_pipeline_and_leave_the_labels_ignored(family):
    texts = ["what is the weather", "book a flight now", "play a song", "river of history", "a novel painter"]
    tok = _tok(texts * 20)
    spec = TaskSpec("classification", family, 16, 16, ["flight", "music", "weather"])
    train = [Example(texts[0], label="weather"), Example(texts[1], label="flight"), Example(texts[2], label="music")]
    inner = make_dataset(spec, train, tok)
    ds = with_outliers(spec, inner, texts[3:], tok)
    assert len(ds) == 5
    batch = ds.collate([ds[i] for i in range(5)])
    assert batch["labels"].tolist() == [2, 0, 1, IGNORE_INDEX, IGNORE_INDEX]
    assert batch[OUTLIER_MASK].tolist() == [False, False, False, True, True]
    alone = make_dataset(spec, [Example(t, label="flight") for t in texts[3:]], tok).collate(
        [make_dataset(spec, [Example(t, label="flight") for t in texts[3:]], tok)[i] for i in range(2)])
    width = alone["input_ids"].size(1)
    # the outlier rows hold exactly what the family's own pipeline makes of those texts (BERT: [CLS] ... [SEP])
    assert torch.equal(batch["input_ids"][3:, :width], alone["input_ids"])


def test_with_outliers_refuses_a_task_without_one_label_per_example():
    tok = _tok(["a b c d e f g"] * 30)
    with pytest.raises(TaskDataError, match="classification"):
        with_outliers(TaskSpec("generation"), None, ["x"], tok)  # type: ignore[arg-type]


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        logits = self.lin(x)
        return ModelOutput(logits=logits, loss=F.cross_entropy(logits, labels) if labels is not None else None)


class _Rows(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

    def collate(self, batch):
        return {"x": torch.stack([x for x, _ in batch]), "labels": torch.tensor([y for _, y in batch])}


def test_trainer_adds_the_weighted_term_and_survives_a_batch_of_outliers_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g)
    inner, outliers = _Rows(x, x[:, :3].argmax(-1)), _Rows(torch.randn(8, 4, generator=g) * 4, torch.zeros(8))
    ds = OutlierExposureDataset(inner, outliers)
    # unshuffled, batch 8: the first batch is labelled rows only, the second outliers only
    dl = DataLoader(ds, batch_size=8, shuffle=False, collate_fn=ds.collate)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-12, warmup_ratio=0.0, schedule="constant", device="cpu",
                      outlier_weight=2.0, grad_clip=None)
    model = _Toy()
    trainer = Trainer(model, dl, None, cfg, device=torch.device("cpu"))
    logs = trainer.fit().history[0]
    with torch.no_grad():
        oe = float(outlier_exposure_loss(model.lin(outliers.x)))
        ce = float(F.cross_entropy(model.lin(x), inner.y))
    # lr 1e-12: the weights do not move measurably, so the logged parts are exactly these; the outlier-only batch counts 2 * oe
    assert logs["train_outlier_exposure_loss"] == pytest.approx(oe / 2, rel=1e-5)
    assert logs["train_loss"] == pytest.approx((ce + 2.0 * oe) / 2, rel=1e-5)
    assert logs["train_accuracy"] == pytest.approx(float((model.lin(x).argmax(-1) == inner.y).float().mean()))


def _max_prob(bundle_dir, texts):
    clf = load_model(bundle_dir, "intents")
    return float(np.mean([max(p.scores.values()) for p in clf.classify(texts)]))


def test_outlier_exposure_flattens_the_transformer_on_outliers_and_keeps_the_labels(tmp_path):
    path, lines = _outlier_file(tmp_path / "wiki.txt")
    params = {"d_model": 32, "n_heads": 2, "num_encoder_layers": 1, "d_ff": 64, "dropout": 0.0}
    train = {"epochs": 20, "batch_size": 16, "lr": 5e-3, "warmup_ratio": 0.0, "num_threads": 1, "device": "cpu"}

    def run(name, **data):
        tree = intent_cfg(tmp_path, family="transformer", name=name, **params)
        tree["data"].update(data)
        tree["tokenizer"] = {"vocab_size": 120, "on_vocab_too_large": "lower"}
        tree["train"] = train
        return run_experiment(validate_config(tree), run_dir=tmp_path / name)

    plain = run("plain")
    exposed = run("exposed", outliers=str(path))
    hist = exposed.metrics["history"]
    assert all("train_outlier_exposure_loss" in h for h in hist) and "train_outlier_exposure_loss" not in \
        plain.metrics["history"][0]
    # the served model answers the data's labels only: no class was added for the outliers
    assert json.loads((exposed.bundle_dir / "labels.json").read_text()) == \
        json.loads((plain.bundle_dir / "labels.json").read_text())
    assert exposed.metrics["valid_in_scope_accuracy"] >= 0.8  # still learns the intents
    # on out-of-domain text the exposed model is much less sure than the plain one
    assert _max_prob(exposed.bundle_dir, lines) < _max_prob(plain.bundle_dir, lines) - 0.2


def test_config_refuses_outliers_where_they_mean_nothing(tmp_path):
    tree = intent_cfg(tmp_path, family="linear")
    tree["data"]["outliers"] = "wiki.txt"
    with pytest.raises(ConfigError, match="model.outliers"):
        validate_config(tree)
    gen = {"name": "g", "data": {"path": "sample", "outliers": "wiki.txt"},
           "model": {"family": "transformer", "task": "generation"}}
    with pytest.raises(ConfigError, match="task 'classification'"):
        validate_config(gen)
    tree = intent_cfg(tmp_path, family="transformer")
    tree["train"] = {"outlier_weight": 0}
    with pytest.raises(ConfigError, match="outlier_weight"):
        validate_config(tree)


def test_a_missing_or_empty_outlier_file_is_named_before_training(tmp_path):
    tree = intent_cfg(tmp_path, family="transformer", d_model=16, n_heads=2, num_encoder_layers=1, d_ff=32)
    tree["data"]["outliers"] = str(tmp_path / "absent.txt")
    with pytest.raises(DataError, match="data.outliers: file not found"):
        run_experiment(validate_config(tree), run_dir=tmp_path / "r1")
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    tree["data"]["outliers"] = str(tmp_path / "blank.txt")
    with pytest.raises(DataError, match="no sentences"):
        run_experiment(validate_config(tree), run_dir=tmp_path / "r2")
