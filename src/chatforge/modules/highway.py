"""Highway layers (Srivastava et al. 2015, "Highway Networks", section 2), as used by ELMo's
character encoder (Peters et al. 2018, section 3.1; Kim et al. 2016, section 2.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Highway(nn.Module):
    """y = t * g(W_h x + b_h) + (1 - t) * x with transform gate t = sigmoid(W_t x + b_t), per layer.

    The gate bias starts at ``gate_bias`` (paper section 4: negative values, -1 to -3, bias the
    layer towards carrying its input through), so a deep stack starts close to the identity.
    """

    def __init__(self, dim: int, num_layers: int = 1, gate_bias: float = -2.0):
        super().__init__()
        if dim <= 0 or num_layers < 0:
            raise ValueError(f"dim={dim} must be positive and num_layers={num_layers} >= 0")
        self.transforms = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))
        self.gates = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))
        for g in self.gates:
            nn.init.constant_(g.bias, gate_bias)

    def forward(self, x: Tensor) -> Tensor:
        for transform, gate in zip(self.transforms, self.gates, strict=True):
            t = torch.sigmoid(gate(x))  # (..., D) in (0, 1)
            x = t * torch.relu(transform(x)) + (1.0 - t) * x
        return x
