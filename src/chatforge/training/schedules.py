"""Learning-rate schedules with linear warmup (as LambdaLR multipliers)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, kind: str) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "inverse_sqrt":  # Vaswani et al. 2017, section 5.3 (normalised to 1 at the end of warmup)
        return math.sqrt(max(warmup_steps, 1) / max(step + 1, 1))
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; allowed: cosine, linear, inverse_sqrt, constant")


def build_scheduler(opt: Optimizer, *, total_steps: int, warmup_steps: int, kind: str) -> LambdaLR:
    return LambdaLR(opt, lambda s: lr_multiplier(s, total_steps=total_steps, warmup_steps=warmup_steps, kind=kind))
