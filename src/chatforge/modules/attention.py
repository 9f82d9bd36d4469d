"""Multi-head attention (Vaswani et al. 2017, section 3.2.2) on ``F.scaled_dot_product_attention``.

One implementation for every family: self- and cross-attention, boolean masks built by
broadcasting (True = may attend), and an optional :class:`KVCache` for incremental decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """Key-padding mask from token ids (B, S) -> bool (B, 1, 1, S); True = real token."""
    return (ids != pad_id)[:, None, None, :]


def causal_mask(q_len: int, k_len: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Causal mask (1, 1, T, S), True on and below the diagonal.

    With ``k_len > q_len`` the queries are the *last* ``q_len`` positions of a ``k_len``-long
    sequence (a cache holds the first ``k_len - q_len``), so the diagonal is shifted accordingly.
    """
    k_len = q_len if k_len is None else k_len
    if k_len < q_len:
        raise ValueError(f"causal_mask: k_len={k_len} must be >= q_len={q_len}")
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
    return mask[None, None]  # (1, 1, T, S)


@dataclass
class KVCache:
    """Keys/values already computed for one attention layer, each (B, H, L, Dh).

    Self-attention appends the new step's keys/values; cross-attention fills it once from the
    encoder output and then only reads it.
    """

    k: Tensor | None = None
    v: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)  # (B, H, L + T, Dh)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reorder(self, index: Tensor) -> None:
        """Keep/reorder batch rows (beam search, dropping finished sequences)."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, section 3.2).

    Takes plain numbers so the Transformer, GPT and BERT share it. ``forward(x)`` is
    self-attention; ``forward(x, memory)`` is cross-attention (encoder-decoder attention).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_heads={n_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attend from ``x`` (B, T, D) to itself or to ``memory`` (B, S, D); returns (B, T, D).

        ``mask``: bool, broadcastable to (B, H, T, S_total), True = may attend; e.g. padding
        (B, 1, 1, S) and/or causal (1, 1, T, S). With a self-attention ``cache`` the new keys are
        appended, so S_total = cached length + T. With a cross-attention ``cache`` the memory
        is projected only on the first call.
        """
        b, t, _ = x.shape
        q = self._split_heads(self.q_proj(x))  # (B, H, T, Dh)
        if memory is None:
            k = self._split_heads(self.k_proj(x))  # (B, H, T, Dh)
            v = self._split_heads(self.v_proj(x))
            if cache is not None:
                k, v = cache.append(k, v)  # (B, H, L + T, Dh)
        elif cache is not None and cache.k is not None:
            k, v = cache.k, cache.v  # (B, H, S, Dh), projected at the first step
        else:
            k = self._split_heads(self.k_proj(memory))  # (B, H, S, Dh)
            v = self._split_heads(self.v_proj(memory))
            if cache is not None:
                cache.append(k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(b, t, self.d_model)  # (B, T, D)
        return self.out_proj(y)

    @torch.no_grad()
    def load_from_torch(self, ref: nn.MultiheadAttention) -> None:
        """Copy weights from ``torch.nn.MultiheadAttention`` (packed q/k/v in_proj)."""
        if ref.embed_dim != self.d_model or ref.num_heads != self.n_heads:
            raise ValueError(
                f"shape mismatch: reference has embed_dim={ref.embed_dim}, num_heads={ref.num_heads}; "
                f"this has d_model={self.d_model}, n_heads={self.n_heads}"
            )
        d = self.d_model
        for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            proj.weight.copy_(ref.in_proj_weight[i * d : (i + 1) * d])
            if proj.bias is not None:
                proj.bias.copy_(ref.in_proj_bias[i * d : (i + 1) * d])
        self.out_proj.weight.copy_(ref.out_proj.weight)
        if self.out_proj.bias is not None:
            self.out_proj.bias.copy_(ref.out_proj.bias)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}"

