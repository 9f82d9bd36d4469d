"""Dilated 1-D convolutions and ByteNet's residual block (Kalchbrenner et al. 2016, "Neural
Machine Translation in Linear Time", sections 3.3-3.4 and figure 3, left).

Tensors are (B, T, C) like the rest of chatforge; the convolutions transpose internally.
A causal convolution can also run one step at a time over a ring buffer of its last
``(kernel_size - 1) * dilation`` inputs (:class:`ConvCache`), so incremental decoding costs
O(layers) per token instead of recomputing the whole prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dilation_schedule(max_dilation: int, num_sets: int) -> list[int]:
    """1, 2, 4, ..., max_dilation, repeated ``num_sets`` times (paper section 3.4: 1..16, x5)."""
    if max_dilation < 1 or max_dilation & (max_dilation - 1):
        raise ValueError(f"max_dilation={max_dilation} must be a power of two >= 1 (1, 2, 4, 8, ...)")
    if num_sets < 1:
        raise ValueError(f"num_sets={num_sets} must be >= 1")
    one = [2**i for i in range(max_dilation.bit_length())]
    return one * num_sets


def receptive_field(kernel_size: int, dilations: Sequence[int]) -> int:
    """Positions one output sees through a stack of convolutions: 1 + sum((k - 1) * d)."""
    return 1 + sum((kernel_size - 1) * d for d in dilations)


@dataclass
class ConvCache:
    """Ring buffer of a causal conv's last ``span = (k - 1) * dilation`` inputs, (B, C, span).

    Slot ``t % span`` holds the input of time t; before time t is written, it still holds
    time ``t - span``, the oldest tap the convolution needs, so each step reads then overwrites.
    Zeros at the start are the causal left padding.
    """

    buffer: Tensor  # (B, C, span)
    t: int = 0

    def reorder(self, index: Tensor) -> None:
        self.buffer = self.buffer.index_select(0, index.to(self.buffer.device))


class DilatedConv1d(nn.Module):
    """Conv over time with ``dilation``; causal (only past and present, "masked" in the paper)
    or centred (non-causal, the source network). Input/output (B, T, C)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 causal: bool = False):
        super().__init__()
        if kernel_size < 1 or dilation < 1:
            raise ValueError(f"kernel_size={kernel_size} and dilation={dilation} must be >= 1")
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)
        self.kernel_size, self.dilation, self.causal = kernel_size, dilation, causal
        self.span = (kernel_size - 1) * dilation

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)  # (B, C, T)
        if self.causal:
            x = F.pad(x, (self.span, 0))  # output t sees inputs t - span .. t
        else:
            x = F.pad(x, (self.span // 2, self.span - self.span // 2))  # centred window
        return self.conv(x).transpose(1, 2)  # (B, T, C_out)

    def new_cache(self, batch_size: int, device=None, dtype=None) -> ConvCache:
        if not self.causal:
            raise ValueError("only a causal convolution can run step by step")
        w = self.conv.weight
        return ConvCache(torch.zeros(batch_size, w.size(1), self.span, device=device or w.device,
                                     dtype=dtype or w.dtype))

    def step(self, x: Tensor, cache: ConvCache) -> Tensor:
        """One time step: x (B, 1, C_in) -> (B, 1, C_out); updates ``cache``."""
        cur = x[:, 0].to(cache.buffer.dtype)  # (B, C_in)
        if self.span == 0:
            taps = cur[:, :, None]  # (B, C_in, 1)
        else:
            # Times t - (k-1)d, ..., t - d live at slots (t - j d) % span; the current input is tap k-1.
            slots = [(cache.t - j * self.dilation) % self.span for j in range(self.kernel_size - 1, 0, -1)]
            past = cache.buffer[:, :, slots]  # (B, C_in, k-1)
            taps = torch.cat([past, cur[:, :, None]], dim=2)  # (B, C_in, k)
            cache.buffer[:, :, cache.t % self.span] = cur
        cache.t += 1
        w = self.conv.weight.to(taps.dtype)
        out = torch.einsum("bik,oik->bo", taps, w) + self.conv.bias.to(taps.dtype)  # (B, C_out)
        return out[:, None]  # (B, 1, C_out)


class ResidualConvBlock(nn.Module):
    """ByteNet residual block (figure 3, left): LN-ReLU-1x1 (d -> d/2), LN-ReLU-dilated conv k
    (d/2 -> d/2, causal in the target network), LN-ReLU-1x1 (d/2 -> d), plus the input.

    ``mask`` (B, T) zeroes padded positions before the dilated conv, so real positions see zeros
    there (as if the sequence ended) and a padded batch equals each row run alone.
    """

    def __init__(self, d_model: int, kernel_size: int, dilation: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        if d_model < 2 or d_model % 2:
            raise ValueError(f"d_model={d_model} must be even (the block narrows to d_model / 2)")
        h = d_model // 2
        self.norm1, self.reduce = nn.LayerNorm(d_model), nn.Linear(d_model, h)  # a 1x1 conv
        self.norm2, self.conv = nn.LayerNorm(h), DilatedConv1d(h, h, kernel_size, dilation, causal)
        self.norm3, self.expand = nn.LayerNorm(h), nn.Linear(h, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.reduce(torch.relu(self.norm1(x)))  # (B, T, d/2)
        h = torch.relu(self.norm2(h))
        if mask is not None:
            h = h * mask.unsqueeze(-1).to(h.dtype)
        h = self.conv(h)  # (B, T, d/2)
        h = self.expand(torch.relu(self.norm3(h)))  # (B, T, d)
        return x + self.dropout(h)

    def new_cache(self, batch_size: int, device=None, dtype=None) -> ConvCache:
        return self.conv.new_cache(batch_size, device, dtype)

    def step(self, x: Tensor, cache: ConvCache) -> Tensor:
        """x (B, 1, d) -> (B, 1, d), the causal block one position at a time."""
        h = torch.relu(self.norm2(self.reduce(torch.relu(self.norm1(x)))))
        h = self.conv.step(h, cache)
        return x + self.dropout(self.expand(torch.relu(self.norm3(h))))


class DilatedConvStack(nn.Module):
    """Residual conv blocks with the given dilations (ByteNet's source or target network)."""

    def __init__(self, d_model: int, kernel_size: int, dilations: Sequence[int], causal: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.dilations = list(dilations)
        self.kernel_size = kernel_size
        self.blocks = nn.ModuleList(ResidualConvBlock(d_model, kernel_size, d, causal, dropout)
                                    for d in self.dilations)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.kernel_size, self.dilations)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return x

    def new_cache(self, batch_size: int, device=None, dtype=None) -> list[ConvCache]:
        return [b.new_cache(batch_size, device, dtype) for b in self.blocks]

    def step(self, x: Tensor, caches: list[ConvCache]) -> Tensor:
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block.step(x, cache)
        return x
