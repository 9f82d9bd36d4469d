"""Token and position embeddings (Vaswani et al. 2017, sections 3.4 and 3.5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TokenEmbedding(nn.Module):
    """Token embedding, optionally multiplied by sqrt(d_model) (Vaswani et al. 2017, section 3.4).

    The scale keeps embeddings (initialised with std d_model**-0.5 so they can double as the
    output projection when tied) on the same scale as the positional encodings.
    """

    def __init__(self, vocab_size: int, d_model: int, padding_idx: int | None = None, scale: bool = True):
        super().__init__()
        if vocab_size <= 0 or d_model <= 0:
            raise ValueError(f"vocab_size={vocab_size} and d_model={d_model} must be positive")
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.d_model = d_model
        self.scale = math.sqrt(d_model) if scale else 1.0
        nn.init.normal_(self.embedding.weight, mean=0.0, std=d_model**-0.5)
        if padding_idx is not None:
            with torch.no_grad():
                self.embedding.weight[padding_idx].zero_()

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.embedding(ids) * self.scale  # (B, T, D)


def sinusoidal_table(max_len: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...); shape (max_len, d_model)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (L, 1)
    div = torch.pow(10000.0, torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (ceil(D/2),)
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos / div)
    table[:, 1::2] = torch.cos(pos / div[: d_model // 2])  # odd d_model: one fewer cos column
    return table.float()


def _check_range(offset: int, length: int, max_len: int) -> None:
    if offset < 0 or offset + length > max_len:
        raise ValueError(
            f"positions {offset}..{offset + length - 1} exceed the model's max_len={max_len}; "
            f"shorten the input or raise max_len in the model config"
        )


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal positional encoding (Vaswani et al. 2017, section 3.5).

    A non-persistent buffer: nothing to learn or save, rebuilt from ``max_len`` and ``d_model``.
    """

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Encodings for positions offset .. offset+length-1, shape (1, length, D)."""
        _check_range(offset, length, self.max_len)
        return self.table[offset : offset + length][None]  # (1, T, D)


class LearnedPositionalEmbedding(nn.Module):
    """Learned absolute positions (as in GPT and BERT); same call signature as the sinusoidal one."""

    def __init__(self, max_len: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=init_std)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        _check_range(offset, length, self.max_len)
        pos = torch.arange(offset, offset + length, device=self.embedding.weight.device)
        return self.embedding(pos)[None]  # (1, T, D)
