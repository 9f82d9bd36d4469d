"""Encoder and decoder layers and stacks (Vaswani et al. 2017, section 3.1), post- or pre-LN.

Post-LN (the paper): ``x = LN(x + Dropout(Sublayer(x)))``. Pre-LN (Xiong et al. 2020, "On Layer
Normalization in the Transformer Architecture"): ``x = x + Dropout(Sublayer(LN(x)))`` with a final
LayerNorm after the stack, which trains stably without warm-up tricks. Sublayer order, dropout
placement and attribute names match ``torch.nn.TransformerEncoderLayer``/``DecoderLayer``, so
weights can be copied from them (``load_from_torch``) and outputs compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from chatforge.modules.attention import KVCache, MultiHeadAttention
from chatforge.modules.feedforward import FeedForward


@dataclass
class DecoderLayerCache:
    """Per-layer decoding state: growing self-attention keys, fixed encoder keys."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)

    def reorder(self, index: Tensor) -> None:
        self.self_attn.reorder(index)
        self.cross_attn.reorder(index)


def _copy_params(dst: nn.Module, src: nn.Module) -> None:
    for name in ("weight", "bias"):
        getattr(dst, name).copy_(getattr(src, name))


class TransformerEncoderLayer(nn.Module):
    """Self-attention + feed-forward, each with residual + LayerNorm (Vaswani et al. 2017, 3.1)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ff = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, S, D); mask bool broadcastable to (B, H, S, S), True = may attend."""
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), mask=mask))
            x = x + self.dropout2(self.ff(self.norm2(x)))
        else:
            x = self.norm1(x + self.dropout1(self.self_attn(x, mask=mask)))
            x = self.norm2(x + self.dropout2(self.ff(x)))
        return x

    @torch.no_grad()
    def load_from_torch(self, ref: nn.TransformerEncoderLayer) -> None:
        self.self_attn.load_from_torch(ref.self_attn)
        for mine, theirs in ((self.ff.linear1, ref.linear1), (self.ff.linear2, ref.linear2),
                             (self.norm1, ref.norm1), (self.norm2, ref.norm2)):
            _copy_params(mine, theirs)


class TransformerDecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention, feed-forward (Vaswani et al. 2017, 3.1)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ff = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        y: Tensor,
        memory: Tensor,
        self_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: DecoderLayerCache | None = None,
    ) -> Tensor:
        """y (B, T, D) decoder states; memory (B, S, D) encoder output.

        self_mask: e.g. causal (1, 1, T, L+T); memory_mask: source padding (B, 1, 1, S).
        """
        sa_cache = cache.self_attn if cache is not None else None
        ca_cache = cache.cross_attn if cache is not None else None
        if self.norm_first:
            y = y + self.dropout1(self.self_attn(self.norm1(y), mask=self_mask, cache=sa_cache))
            y = y + self.dropout2(self.cross_attn(self.norm2(y), memory, mask=memory_mask, cache=ca_cache))
            y = y + self.dropout3(self.ff(self.norm3(y)))
        else:
            y = self.norm1(y + self.dropout1(self.self_attn(y, mask=self_mask, cache=sa_cache)))
            y = self.norm2(y + self.dropout2(self.cross_attn(y, memory, mask=memory_mask, cache=ca_cache)))
            y = self.norm3(y + self.dropout3(self.ff(y)))
        return y

    @torch.no_grad()
    def load_from_torch(self, ref: nn.TransformerDecoderLayer) -> None:
        self.self_attn.load_from_torch(ref.self_attn)
        self.cross_attn.load_from_torch(ref.multihead_attn)
        for mine, theirs in ((self.ff.linear1, ref.linear1), (self.ff.linear2, ref.linear2),
                             (self.norm1, ref.norm1), (self.norm2, ref.norm2), (self.norm3, ref.norm3)):
            _copy_params(mine, theirs)


class TransformerEncoder(nn.Module):
    """A stack of encoder layers; a final LayerNorm when ``final_norm`` (needed for pre-LN)."""

    def __init__(self, num_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False, final_norm: bool | None = None):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, n_heads, d_ff, dropout, activation, norm_first)
            for _ in range(num_layers)
        )
        # Post-LN outputs are already normalised; pre-LN leaves the residual stream un-normalised.
        self.norm = nn.LayerNorm(d_model) if (norm_first if final_norm is None else final_norm) else None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x) if self.norm is not None else x


class TransformerDecoder(nn.Module):
    """A stack of decoder layers with per-layer caches for incremental decoding."""

    def __init__(self, num_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False, final_norm: bool | None = None):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, n_heads, d_ff, dropout, activation, norm_first)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model) if (norm_first if final_norm is None else final_norm) else None

    def new_cache(self) -> list[DecoderLayerCache]:
        return [DecoderLayerCache() for _ in self.layers]

    def forward(
        self,
        y: Tensor,
        memory: Tensor,
        self_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: list[DecoderLayerCache] | None = None,
    ) -> Tensor:
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers; the decoder has {len(self.layers)}")
        for i, layer in enumerate(self.layers):
            y = layer(y, memory, self_mask, memory_mask, cache[i] if cache is not None else None)
        return self.norm(y) if self.norm is not None else y


@torch.no_grad()
def load_stack_from_torch(mine: TransformerEncoder | TransformerDecoder,
                          ref: nn.TransformerEncoder | nn.TransformerDecoder) -> None:
    """Copy a ``torch.nn.TransformerEncoder``/``Decoder`` into ours (layer count and norms must match)."""
    if len(mine.layers) != len(ref.layers):
        raise ValueError(f"layer count mismatch: {len(mine.layers)} here, {len(ref.layers)} in the reference")
    if (mine.norm is None) != (ref.norm is None):
        raise ValueError(
            f"final norm mismatch: here {'present' if mine.norm is not None else 'absent'}, "
            f"reference {'present' if ref.norm is not None else 'absent'}"
        )
    for a, b in zip(mine.layers, ref.layers, strict=True):
        a.load_from_torch(b)
    if mine.norm is not None:
        _copy_params(mine.norm, ref.norm)
