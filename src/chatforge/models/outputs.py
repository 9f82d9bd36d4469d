"""Typed model outputs: every model returns one of these, never a tuple."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """What every chatforge model returns from ``forward``.

    ``logits``: (B, T, V) for token-level outputs, (B, C) for sequence classification.
    ``loss``: the total training loss when labels were given, else None.
    ``losses``: the named parts of the loss (e.g. ``{"mlm": ..., "nsp": ...}``), logged separately.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
