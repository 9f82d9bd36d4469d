"""Learning-rate schedules: warmup ramp, the paper's inverse-sqrt formula, decay end points."""

import math

import pytest
import torch

from chatforge.training.schedules import build_scheduler, lr_multiplier


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "inverse_sqrt"])
def test_warmup_ramps_linearly_to_one(kind):
    got = [lr_multiplier(s, total_steps=100, warmup_steps=4, kind=kind) for s in range(4)]
    assert got == [0.25, 0.5, 0.75, 1.0]


def test_inverse_sqrt_is_vaswani_formula_normalised_to_one_after_warmup():
    """Vaswani et al. 2017 (5.3): lr ∝ min(n^-0.5, n * warmup^-1.5), n counted from 1."""
    warmup = 8
    peak = warmup**-0.5
    for step in range(40):
        n = step + 1
        paper = min(n**-0.5, n * warmup**-1.5) / peak
        assert lr_multiplier(step, total_steps=40, warmup_steps=warmup, kind="inverse_sqrt") == pytest.approx(paper)


def test_linear_and_cosine_decay_from_one_to_zero_after_warmup():
    kw = {"total_steps": 110, "warmup_steps": 10}
    assert lr_multiplier(10, kind="linear", **kw) == 1.0
    assert lr_multiplier(60, kind="linear", **kw) == pytest.approx(0.5)
    assert lr_multiplier(110, kind="linear", **kw) == 0.0
    assert lr_multiplier(500, kind="linear", **kw) == 0.0  # clamped past the end
    assert lr_multiplier(10, kind="cosine", **kw) == 1.0
    assert lr_multiplier(60, kind="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(35, kind="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(110, kind="cosine", **kw) == pytest.approx(0.0)
    assert lr_multiplier(3, kind="constant", total_steps=5, warmup_steps=0) == 1.0


def test_unknown_schedule_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown schedule 'step'; allowed: cosine, linear, inverse_sqrt, constant"):
        lr_multiplier(0, total_steps=10, warmup_steps=0, kind="step")


def test_scheduler_sets_the_optimizer_lr_to_base_times_multiplier():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, kind="linear")
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1 * lr_multiplier(s, total_steps=10, warmup_steps=2, kind="linear") for s in range(10)]
    assert seen == pytest.approx(expected)
