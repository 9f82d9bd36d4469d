"""The task-specific scalar mix of ELMo (Peters et al. 2018, section 3.2, equation 1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ScalarMix(nn.Module):
    """ELMo_task = gamma * sum_j softmax(s)_j * h_j over ``num_layers`` equally shaped layers.

    ``s`` (softmax-normalised layer weights) and ``gamma`` (a scale that helps optimisation,
    section 3.2) are learned per task. ``layer_norm=True`` first normalises each layer over its
    non-masked elements, the paper's option "to apply layer normalization to each biLM layer
    before weighting" (footnote to equation 1). Initial weights are all zero (a uniform mix).
    """

    def __init__(self, num_layers: int, layer_norm: bool = False, trainable: bool = True,
                 initial_scalars: list[float] | None = None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1")
        init = [0.0] * num_layers if initial_scalars is None else list(initial_scalars)
        if len(init) != num_layers:
            raise ValueError(f"initial_scalars has {len(init)} values; expected num_layers={num_layers}")
        self.num_layers = num_layers
        self.layer_norm = layer_norm
        self.scalars = nn.Parameter(torch.tensor(init, dtype=torch.float32), requires_grad=trainable)
        self.gamma = nn.Parameter(torch.ones(1), requires_grad=trainable)

    @staticmethod
    def _masked_norm(h: Tensor, mask: Tensor, eps: float = 1e-12) -> Tensor:
        # One mean/variance per layer over every real (unmasked) element, as in the paper's
        # reference implementation; padding never shifts the statistics.
        m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        n = m.sum() * h.size(-1)
        mean = (h * m).sum() / n
        var = (((h - mean) * m) ** 2).sum() / n
        return (h - mean) / torch.sqrt(var + eps)

    def forward(self, layers: list[Tensor] | Tensor, mask: Tensor | None = None) -> Tensor:
        """layers: a list (or stacked first dimension) of ``num_layers`` tensors (B, T, D);
        mask (B, T) bool (needed for ``layer_norm``) -> (B, T, D)."""
        if len(layers) != self.num_layers:
            raise ValueError(f"got {len(layers)} layers; this ScalarMix mixes {self.num_layers}")
        if self.layer_norm and mask is None:
            raise ValueError("ScalarMix(layer_norm=True) needs the (B, T) mask of real tokens")
        weights = torch.softmax(self.scalars, dim=0)  # (L,)
        out = None
        for w, h in zip(weights, layers, strict=True):
            if self.layer_norm:
                h = self._masked_norm(h, mask)
            out = w * h if out is None else out + w * h
        return self.gamma * out
