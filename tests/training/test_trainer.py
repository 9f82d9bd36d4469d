"""The family-agnostic Trainer: loss falls, accuracy ignores padding, best weights kept,
early stopping, seed reproducibility, and state_dict round trips."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from chatforge.config import TrainConfig, validate_config
from chatforge.models.outputs import ModelOutput
from chatforge.tasks import IGNORE_INDEX
from chatforge.training.run import run_experiment
from chatforge.training.trainer import Callback, Trainer, _accuracy_counts


class _Toy(nn.Module):
    """A linear classifier returning ModelOutput, like every family does."""

    def __init__(self, d: int = 4, c: int = 3):
        super().__init__()
        self.lin = nn.Linear(d, c)

    def forward(self, x, labels=None):
        logits = self.lin(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)


class _DS(Dataset):
    def __init__(self, n: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x[:, :3].argmax(-1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=5, batch_size=8, lr=0.05, warmup_ratio=0.0, schedule="constant", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_accuracy_counts_excludes_padding():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]])  # predicts 0, 1, 0
    labels = torch.tensor([[0, 0, IGNORE_INDEX]])  # right, wrong, padding
    assert _accuracy_counts(logits, labels) == (1, 2)
    # sequence classification (B, C)
    assert _accuracy_counts(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])) == (1, 2)


def test_loss_falls_on_toy_problem():
    torch.manual_seed(0)
    t = Trainer(_Toy(), DataLoader(_DS(), batch_size=8), DataLoader(_DS(seed=1), batch_size=8), _cfg(epochs=8))
    hist = t.fit().history
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    assert t.step == 8 * 3


class _Scripted(Callback):
    """Records the weights at the end of every epoch."""

    def __init__(self):
        self.weights: dict[int, torch.Tensor] = {}

    def on_epoch_end(self, trainer, epoch, logs):
        self.weights[epoch] = trainer.model.lin.weight.detach().clone()


def test_best_weights_kept_and_early_stopping():
    torch.manual_seed(0)
    model = _Toy()
    valid = DataLoader(_DS(seed=1), batch_size=8)
    t = Trainer(model, DataLoader(_DS(), batch_size=8), valid, _cfg(epochs=10, early_stopping_patience=2))
    losses = iter([1.0, 0.5, 0.9, 0.8, 0.7, 0.6])
    t.evaluate = lambda loader: {"loss": next(losses)}  # scripted validation: best at epoch 2
    rec = _Scripted()
    t.callbacks.append(rec)
    result = t.fit()
    assert result.best_epoch == 2 and result.best_valid_loss == 0.5
    assert len(result.history) == 4  # epochs 3 and 4 did not improve: patience 2 stops after epoch 4
    assert torch.equal(model.lin.weight, rec.weights[2])  # the best epoch's weights, not the last
    assert not torch.equal(rec.weights[4], rec.weights[2])


def test_monitor_valid_chrf_keeps_the_best_chrf_epoch_not_the_lowest_loss():
    """train.monitor: valid_chrf: the epoch with the highest chrF wins (and early stopping watches it),
    although its validation loss is not the lowest."""
    torch.manual_seed(0)
    model = _Toy()
    losses = iter([1.0, 0.5, 0.4, 0.3, 0.2, 0.1])
    chrfs = iter([10.0, 30.0, 20.0, 25.0, 29.0, 40.0])
    t = Trainer(model, DataLoader(_DS(), batch_size=8), DataLoader(_DS(seed=1), batch_size=8),
                _cfg(epochs=10, early_stopping_patience=3, monitor="valid_chrf"),
                valid_metrics=lambda m: {"chrf": next(chrfs)})
    t.evaluate = lambda loader: {"loss": next(losses)}
    rec = _Scripted()
    t.callbacks.append(rec)
    result = t.fit()
    assert (result.best_epoch, result.best_score) == (2, 30.0)
    assert len(result.history) == 5 and result.history[1]["valid_chrf"] == 30.0  # 3 epochs without a better chrF
    assert torch.equal(model.lin.weight, rec.weights[2])
    # Resuming from a checkpoint keeps the monitored best.
    fresh = Trainer(_Toy(), DataLoader(_DS(), batch_size=8), None, _cfg(monitor="valid_chrf"))
    fresh.load_state_dict(t.state_dict())
    assert (fresh.result.best_epoch, fresh.result.best_score) == (2, 30.0)


def test_max_steps_stops_mid_epoch():
    t = Trainer(_Toy(), DataLoader(_DS(), batch_size=8), None, _cfg(epochs=5, max_steps=4))
    assert t.fit().steps == 4 and t.epoch == 2 and t.batches_done == 1


def test_state_dict_round_trip_continues_identically():
    """Stopping after k steps, restoring into a fresh trainer and continuing = never stopping."""
    def make():
        torch.manual_seed(0)
        return Trainer(_Toy(), DataLoader(_DS(), batch_size=8, shuffle=True,
                                          generator=torch.Generator().manual_seed(3)),
                       None, _cfg(epochs=3))

    ref = make()
    ref.fit()

    class Stop(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 5:
                self.state = trainer.state_dict()
                raise KeyboardInterrupt

    first, stop = make(), Stop()
    first.callbacks.append(stop)
    try:
        first.fit()
    except KeyboardInterrupt:
        pass
    second = make()
    second.load_state_dict(stop.state)
    second.fit()
    assert torch.equal(second.model.lin.weight, ref.model.lin.weight)
    assert [h["train_loss"] for h in second.result.history] == [h["train_loss"] for h in ref.result.history]


def _tiny_tree(tmp_path, **train):
    return {
        "name": "tiny", "seed": 0,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.0},
        "tokenizer": {"vocab_size": 600},
        "model": {"family": "transformer", "task": "classification", "d_model": 32, "n_heads": 2,
                  "num_encoder_layers": 1, "d_ff": 64, "dropout": 0.1},
        "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "num_threads": 1, "device": "cpu",
                  "warmup_ratio": 0.0, **train},
        "tracking": {"enabled": False},
        "output": {"dir": str(tmp_path)},
    }


def test_tiny_transformer_loss_falls_and_seed_reproduces(tmp_path):
    cfg = validate_config(_tiny_tree(tmp_path, epochs=3))
    a = run_experiment(cfg, run_dir=tmp_path / "a")
    b = run_experiment(cfg, run_dir=tmp_path / "b")
    hist = a.metrics["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    wa = load_file(a.bundle_dir / "weights.safetensors")
    wb = load_file(b.bundle_dir / "weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = run_experiment(validate_config({**_tiny_tree(tmp_path, epochs=3), "seed": 1}), run_dir=tmp_path / "c")
    wc = load_file(c.bundle_dir / "weights.safetensors")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_run_with_monitor_valid_chrf_scores_greedy_replies_each_epoch(tmp_path):
    import pytest

    from chatforge.config import ConfigError
    from chatforge.evaluation.metrics import corpus_chrf
    from chatforge.inference import load_model

    tree = _tiny_tree(tmp_path, epochs=3, monitor="valid_chrf", monitor_examples=8, max_source_len=16,
                      max_target_len=8)
    tree["model"].update(task="generation", num_decoder_layers=1)
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "gen")
    hist = res.metrics["history"]
    chrfs = [h["valid_chrf"] for h in hist]
    assert len(chrfs) == 3 and all(0.0 <= c <= 100.0 for c in chrfs)
    assert res.metrics["monitor"] == "valid_chrf" and res.metrics["best_score"] == max(chrfs)
    assert res.metrics["best_epoch"] == hist[chrfs.index(max(chrfs))]["epoch"]
    # The figure is what the kept model's greedy replies score on the same first 8 validation pairs.
    from chatforge.training.run import load_splits

    _, valid, _ = load_splits(validate_config(tree))[:3]
    gen = load_model(res.bundle_dir, "g")
    from chatforge.decoding import GenerationOptions

    opts = GenerationOptions(max_new_tokens=8)
    hyps = ["".join(d.text for d in gen.stream(e.text, opts)) for e in valid[:8]]
    assert corpus_chrf(hyps, [e.response for e in valid[:8]]) == pytest.approx(res.metrics["best_score"], abs=1e-6)
    tree["model"]["task"] = "classification"
    with pytest.raises(ConfigError, match="train.monitor='valid_chrf' scores generated replies"):
        validate_config(tree)


def test_auto_precision_is_resolved_for_this_machine_and_recorded(tmp_path):
    from chatforge.runtime import pick_train_precision, read_cpu_flags

    res = run_experiment(validate_config(_tiny_tree(tmp_path, epochs=1, precision="auto")), run_dir=tmp_path / "r")
    expected = pick_train_precision(read_cpu_flags()[1])[0]
    assert res.metrics["train_precision"] == expected
    fixed = run_experiment(validate_config(_tiny_tree(tmp_path, epochs=1, precision="fp32")), run_dir=tmp_path / "f")
    assert fixed.metrics["train_precision"] == "fp32"
