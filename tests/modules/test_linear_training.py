"""fp32 linear layers trained on oneDNN's matmul (``modules.linear.OneDNNTrainingLinear``) and the Trainer's choice
of it (``training.trainer.fp32_training_linear``): the same outputs and gradients as torch's autograd of ``F.linear``,
up to float rounding, for every shape of call a model makes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chatforge.config import TrainConfig
from chatforge.models.outputs import ModelOutput
from chatforge.modules import linear as linear_mod
from chatforge.training.trainer import Callback, Trainer, fp32_training_linear

needs_onednn = pytest.mark.skipif(linear_mod._onednn_linear() is None, reason="this torch build has no oneDNN linear op")
TOL = {"atol": 1e-4, "rtol": 1e-4}


def _mode(min_macs: int = 0):
    mode = linear_mod.onednn_training_linear(min_macs=min_macs)
    assert mode is not None
    return mode


def _grads(fn, *tensors):
    """fn's output and the gradients of a fixed random projection of it with respect to ``tensors``."""
    for t in tensors:
        t.grad = None
    out = fn()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), [None if t.grad is None else t.grad.clone() for t in tensors]


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (2, 3, 4, 48)])
def test_outputs_and_gradients_match_torch(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(48, 40, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    want, want_grads = _grads(lambda: layer(x), *params)
    mode = _mode()

    def routed():
        with mode:
            return layer(x)

    got, got_grads = _grads(routed, *params)
    assert mode.calls == 1
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **TOL)


@needs_onednn
def test_strided_inputs_frozen_weights_and_inputs_without_gradient():
    torch.manual_seed(0)
    weight = torch.randn(40, 48)  # frozen: no gradient wanted
    bias = torch.randn(40, requires_grad=True)
    base = torch.randn(48, 6, requires_grad=True)
    mode = _mode()

    def call(routed: bool):
        x = base.t()  # a transposed view, not contiguous
        if not routed:
            return F.linear(x, weight, bias)
        with mode:
            return F.linear(x, weight, bias=bias)  # bias by keyword too

    want, want_grads = _grads(lambda: call(False), base, bias)
    got, got_grads = _grads(lambda: call(True), base, bias)
    assert mode.calls == 1 and weight.grad is None
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    bias.grad = None
    with mode:  # an input that wants no gradient, as the first layer sees token embeddings under no_grad
        y = F.linear(torch.randn(4, 48), weight, bias)
    y.sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((40,), 4.0))


@needs_onednn
def test_a_weight_used_twice_accumulates_both_gradients():
    """A tied output head: the embedding matrix is the weight of two calls (or of a call and a lookup)."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 32)
    ids = torch.randint(0, 50, (4, 6))

    def model():
        h = emb(ids)
        return F.linear(torch.tanh(F.linear(h, emb.weight[:32])), emb.weight)

    want, [want_grad] = _grads(model, emb.weight)
    mode = _mode()

    def routed():
        with mode:
            return model()

    got, [got_grad] = _grads(routed, emb.weight)
    assert mode.calls == 2
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_grad, want_grad, **TOL)


@needs_onednn
def test_small_non_fp32_and_non_linear_calls_run_as_they_would():
    mode = _mode(min_macs=linear_mod.TRAIN_MIN_MACS)
    small = nn.Linear(8, 8)
    with mode:
        small(torch.randn(4, 8))  # 256 multiply-adds: oneDNN's call would cost more than it saves
        nn.Linear(64, 64).to(torch.bfloat16)(torch.randn(4096, 64, dtype=torch.bfloat16))  # bf16: autocast's kernels
        torch.randn(64, 64) @ torch.randn(64, 64)  # not F.linear
    assert mode.calls == 0
    with mode:
        nn.Linear(64, 64)(torch.randn(4096, 64))  # 16.8 M multiply-adds
    assert mode.calls == 1


# ------------------------------------------------------------------ the Trainer's choice
class _Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(256, 1024), nn.Linear(1024, 5)

    def forward(self, x, labels=None):
        logits = self.out(torch.relu(self.inp(x)))
        return ModelOutput(logits=logits, loss=F.cross_entropy(logits, labels) if labels is not None else None)


def _train(monkeypatch, kernels: str, precision: str = "fp32") -> tuple[Trainer, list[float]]:
    monkeypatch.setenv("CHATFORGE_FP32_LINEAR", kernels)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 256, generator=g)
    data = [{"x": x[i: i + 48], "labels": x[i: i + 48, :5].argmax(-1)} for i in (0, 48)]
    torch.manual_seed(0)
    trainer = Trainer(_Wide(), data, None, TrainConfig(epochs=3, batch_size=48, lr=0.01, warmup_ratio=0.0,
                                                      schedule="constant", device="cpu", precision=precision))
    losses = []

    class Losses(Callback):
        def on_step_end(self, trainer, step, logs):
            losses.append(logs["loss"])

    trainer.callbacks.append(Losses())
    trainer.fit()
    return trainer, losses


@needs_onednn
def test_the_trainer_trains_fp32_linear_layers_on_onednn_where_chosen(monkeypatch):
    onednn, got = _train(monkeypatch, "onednn")
    aten, want = _train(monkeypatch, "aten")
    assert aten.linear_mode is None
    assert onednn.linear_mode is not None and onednn.linear_mode.calls >= 6  # 48 x 256 x 1024 routed, 48 x 1024 x 5 not
    assert len(got) == len(want) == 6
    # The same losses step by step (the weights themselves are not compared: AdamW turns the float rounding of a
    # gradient entry near zero into a step of up to lr either way).
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-4)
    assert got[-1] < got[0]


def test_only_fp32_on_cpu_with_onednn_chosen(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("CHATFORGE_FP32_LINEAR", "onednn")
    assert fp32_training_linear("bf16", cpu) is None
    assert fp32_training_linear("fp32", torch.device("meta")) is None
    assert (fp32_training_linear("fp32", cpu) is None) == (linear_mod._onednn_linear() is None)
    monkeypatch.setenv("CHATFORGE_FP32_LINEAR", "aten")
    assert fp32_training_linear("fp32", cpu) is None
    monkeypatch.setenv("CHATFORGE_FP32_LINEAR", "auto")
    assert (fp32_training_linear("fp32", cpu) is None) == (linear_mod._onednn_linear() is None or
                                                          "AMD" not in (runtime_model() or "").upper())


def runtime_model() -> str | None:
    from chatforge.runtime import read_cpu_flags

    return read_cpu_flags()[0]
