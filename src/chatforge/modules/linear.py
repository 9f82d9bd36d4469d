"""Calling a linear layer on the inference fast paths, whatever its weights are stored as.

Decode steps call ``F.linear`` on a layer's weight and bias directly (no ``Module.__call__``: batch-1
decoding is bound by per-call overhead). A dynamically quantized layer (``inference.load_model(...,
precision="int8")``: ``torch.ao.nn.quantized.dynamic.Linear``) keeps its weight packed for the int8
kernels, where ``weight`` is a method returning a dequantized copy, so it must be called as a module.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn


def linear_fn(layer: nn.Module) -> Callable[[Tensor], Tensor]:
    """``x -> layer(x)``: ``F.linear`` on the float weights of an ``nn.Linear``, else the module itself."""
    if isinstance(layer, nn.Linear):
        return partial(F.linear, weight=layer.weight, bias=layer.bias)
    return layer


def apply_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``, without ``Module.__call__`` for a float ``nn.Linear``."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)
