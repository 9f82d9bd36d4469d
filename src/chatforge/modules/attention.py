"""Multi-head attention (Vaswani et al. 2017, section 3.2.2) on ``F.scaled_dot_product_attention``.

One implementation for every family: self- and cross-attention, boolean masks built by
broadcasting (True = may attend), and an optional :class:`KVCache` for incremental decoding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatforge.modules.linear import apply_linear


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


# Attention kernels for training on CPU. ``CHATFORGE_ATTENTION``: ``auto`` (default) computes small attention
# products as two matmuls around a softmax (:func:`materialized_attention`) when gradients flow on CPU, and ``sdpa``
# always calls ``F.scaled_dot_product_attention``. Measured (benchmarks/attention_kernels.py, results in
# benchmarks/results/attention-kernels-*; AMD EPYC Zen 5, 2 threads, 4 heads of 64, forward + backward): SDPA's CPU
# flash kernel is slow in bf16 (its backward above all): materialized was 2.2-6.1x faster at lengths 32-512; in fp32
# 1.2-1.6x up to 128 and 0.87-0.96x from 256. Past these query x key positions per head SDPA keeps the product
# (and the (B, H, T, S) scores, which it never materializes, stay unallocated).
ATTENTION_ENV = "CHATFORGE_ATTENTION"
ATTENTION_CHOICES = ("auto", "sdpa")
MATERIALIZE_MAX_POSITIONS = {torch.bfloat16: 512 * 512}
MATERIALIZE_MAX_POSITIONS_DEFAULT = 128 * 128  # fp32 and any other dtype


def materialize_limit(dtype: torch.dtype) -> int:
    """Query x key positions per head up to which ``auto`` materializes a product of ``dtype``."""
    return MATERIALIZE_MAX_POSITIONS.get(dtype, MATERIALIZE_MAX_POSITIONS_DEFAULT)


def attention_kernel(environ=None) -> str:
    """``CHATFORGE_ATTENTION``, checked: ``auto`` or ``sdpa``."""
    env = os.environ if environ is None else environ
    choice = env.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"{ATTENTION_ENV}={env.get(ATTENTION_ENV)!r} is not supported; allowed: "
                         f"{', '.join(ATTENTION_CHOICES)}")
    return choice


def use_materialized(q: Tensor, k: Tensor, mask: Tensor | None) -> bool:
    """Whether :meth:`MultiHeadAttention._attend` computes this product with :func:`materialized_attention`:
    on CPU, while autograd records (training), for at most :func:`materialize_limit` query x key positions,
    with a boolean mask or none, unless ``CHATFORGE_ATTENTION=sdpa``. Inference keeps SDPA (decoding's
    outputs are compared token for token with other engines)."""
    return (q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad
            and q.size(-2) * k.size(-2) <= materialize_limit(q.dtype)
            and (mask is None or mask.dtype == torch.bool) and attention_kernel() == "auto")


_CAUSAL: dict[tuple[int, int, str], Tensor] = {}


def materialized_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                           is_causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)`` for a
    boolean ``mask`` (True = may attend), written out: scores = (q / sqrt(Dh)) k^T, masked, softmax, dropout,
    times v. q (B, H, T, Dh), k and v (B, H, S, Dh) -> (B, H, T, Dh). As SDPA does, ``is_causal`` aligns the
    diagonal top-left and a query row with no key to attend to gets zeros (not NaN), and its gradient too.
    """
    t, s = q.size(-2), k.size(-2)
    scores = torch.matmul(q * q.size(-1) ** -0.5, k.transpose(-2, -1))  # (B, H, T, S)
    if is_causal:
        if mask is not None:
            raise ValueError("materialized_attention: pass either mask or is_causal, not both")
        key = (t, s, str(q.device))
        if key not in _CAUSAL:
            _CAUSAL[key] = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        mask = _CAUSAL[key]
    empty = None
    if mask is not None:
        # In place: matmul's backward reads its inputs, not its output.
        scores = scores.masked_fill_(~mask, float("-inf"))
        if not is_causal:
            empty = ~mask.any(-1, keepdim=True)  # rows with nothing to attend to
            empty = empty if bool(empty.any()) else None
    probs = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, v)  # (B, H, T, Dh)


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


class GrowingKVCache(KVCache):
    """Self-attention cache in preallocated buffers that grow by doubling.

    Appending one decoding step copies only that step's (B, H, 1, Dh) keys/values, where
    :class:`KVCache`'s ``torch.cat`` copies the whole history every step (quadratic in the reply
    length). ``k``/``v`` are views of the first ``len(self)`` positions of the buffers.
    """

    def __init__(self, initial_capacity: int = 64):
        super().__init__()
        self._k_buf: Tensor | None = None
        self._v_buf: Tensor | None = None
        self._len = 0
        self._initial = max(1, initial_capacity)

    def __len__(self) -> int:
        return self._len

    @classmethod
    def from_tensors(cls, k: Tensor, v: Tensor, headroom: int = 64) -> GrowingKVCache:
        """A cache holding ``k``/``v`` (B, H, L, Dh), copied into buffers with room for ``headroom`` more
        positions (continuous batching rebuilds a batch's caches when rows join or leave)."""
        cache = cls(initial_capacity=k.size(2) + headroom)
        if k.size(2):
            cache.append(k, v)
        return cache

    def _grow(self, like: Tensor, need: int) -> None:
        cap = 0 if self._k_buf is None else self._k_buf.size(2)
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, self._initial)
        b, h, _, dh = like.shape
        k_buf = like.new_empty((b, h, new_cap, dh))  # (B, H, C, Dh)
        v_buf = like.new_empty((b, h, new_cap, dh))
        if self._len:
            k_buf[:, :, : self._len] = self._k_buf[:, :, : self._len]
            v_buf[:, :, : self._len] = self._v_buf[:, :, : self._len]
        self._k_buf, self._v_buf = k_buf, v_buf

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t = k.size(2)
        self._grow(k, self._len + t)
        self._k_buf[:, :, self._len : self._len + t] = k
        self._v_buf[:, :, self._len : self._len + t] = v
        self._len += t
        self.k = self._k_buf[:, :, : self._len]  # (B, H, L + T, Dh) views, no copy
        self.v = self._v_buf[:, :, : self._len]
        return self.k, self.v

    def reserve(self, t: int, like: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """Room for ``t`` more positions -> the (grown) key and value buffers (B, H, C, Dh), for a caller that
        writes positions ``len(self)`` to ``len(self) + t - 1`` itself and then calls :meth:`advance`
        (the scripted GPT step). A cache without buffers yet makes them shaped and typed as ``like``
        (B, H, any, Dh), as its first :meth:`append` would; without ``like`` it returns None."""
        if self._k_buf is None and like is None:
            return None
        self._grow(self._k_buf if self._k_buf is not None else like, self._len + t)
        return self._k_buf, self._v_buf

    def advance(self, t: int) -> None:
        """Count ``t`` positions written into the buffers from :meth:`reserve` as appended."""
        self._len += t
        self.k = self._k_buf[:, :, : self._len]
        self.v = self._v_buf[:, :, : self._len]

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative decoding drops rejected draft tokens)."""
        if not 0 <= length <= self._len:
            raise ValueError(f"cannot truncate a cache of {self._len} positions to {length}")
        self._len = length
        if self._k_buf is not None:
            self.k = self._k_buf[:, :, :length]
            self.v = self._v_buf[:, :, :length]

    def reorder(self, index: Tensor) -> None:
        if self._k_buf is not None:
            self._k_buf = self._k_buf.index_select(0, index)
            self._v_buf = self._v_buf.index_select(0, index)
            self.k = self._k_buf[:, :, : self._len]
            self.v = self._v_buf[:, :, : self._len]


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, section 3.2).

    Takes plain numbers so the Transformer, GPT and BERT share it. ``forward(x)`` is
    self-attention; ``forward(x, memory)`` is cross-attention (encoder-decoder attention).
    ``fused_qkv=True`` (self-attention only, e.g. GPT) projects q, k and v with one
    ``qkv_proj`` matmul of width 3·d_model, as GPT-2's ``c_attn`` does, which is faster on CPU.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 fused_qkv: bool = False):
        super().__init__()
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_heads={n_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)  # rows: q, k, v
        else:
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
        is_causal: bool = False,
    ) -> Tensor:
        """Attend from ``x`` (B, T, D) to itself or to ``memory`` (B, S, D); returns (B, T, D).

        ``mask``: bool, broadcastable to (B, H, T, S_total), True = may attend; e.g. padding
        (B, 1, 1, S) and/or causal (1, 1, T, S). With a self-attention ``cache`` the new keys are
        appended, so S_total = cached length + T. With a cross-attention ``cache`` the memory
        is projected only on the first call.

        ``is_causal=True`` (self-attention without ``mask``) lets SDPA apply causal masking itself
        (no mask tensor, its fastest kernels); it is only valid while nothing is cached yet, since
        SDPA aligns the causal diagonal top-left.
        """
        b, t, _ = x.shape
        if self.fused_qkv:
            if memory is not None:
                raise ValueError("fused_qkv attention is self-attention only; memory must be None")
            q, k, v = self.qkv_proj(x).split(self.d_model, dim=-1)  # 3 x (B, T, D)
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)  # (B, H, T, Dh)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, H, L + T, Dh)
            causal = is_causal and mask is None
            if causal and cache is not None and len(cache) > t:
                raise ValueError("is_causal=True with a non-empty cache; pass an explicit causal mask")
            return self._attend(q, k, v, mask, causal, b, t)
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
        causal = is_causal and mask is None and memory is None
        if causal and cache is not None and len(cache) > t:
            raise ValueError("is_causal=True with a non-empty cache; pass an explicit causal mask")
        return self._attend(q, k, v, mask, causal, b, t)

    def cached_self_attention(self, x: Tensor, cache: KVCache, mask: Tensor | None = None) -> Tensor:
        """Self-attention of new tokens x (B, T, D) over ``cache`` + themselves, for inference.

        The same arithmetic as ``forward(x, mask=mask, cache=cache)`` in eval mode in fewer calls
        (batch-1 decoding is bound by per-call overhead). ``mask`` (B, 1, T, L + T) or None = attend
        to everything (one new token per row needs no causal mask).
        """
        b, t, _ = x.shape
        if self.fused_qkv:
            qkv = apply_linear(self.qkv_proj, x)  # (B, T, 3D)
            q, k, v = qkv.view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        else:
            q = self._split_heads(apply_linear(self.q_proj, x))  # (B, H, T, Dh)
            k = self._split_heads(apply_linear(self.k_proj, x))
            v = self._split_heads(apply_linear(self.v_proj, x))
        k, v = cache.append(k, v)  # (B, H, L + T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(b, t, self.d_model)  # (B, T, D)
        return apply_linear(self.out_proj, y)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
                b: int, t: int) -> Tensor:
        dropout_p = self.dropout if self.training else 0.0
        if use_materialized(q, k, mask):
            y = materialized_attention(q, k, v, mask, is_causal, dropout_p)  # (B, H, T, Dh)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
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
        if self.fused_qkv:
            self.qkv_proj.weight.copy_(ref.in_proj_weight)
            if self.qkv_proj.bias is not None:
                self.qkv_proj.bias.copy_(ref.in_proj_bias)
            self.out_proj.weight.copy_(ref.out_proj.weight)
            if self.out_proj.bias is not None:
                self.out_proj.bias.copy_(ref.out_proj.bias)
            return
        for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            proj.weight.copy_(ref.in_proj_weight[i * d : (i + 1) * d])
            if proj.bias is not None:
                proj.bias.copy_(ref.in_proj_bias[i * d : (i + 1) * d])
        self.out_proj.weight.copy_(ref.out_proj.weight)
        if self.out_proj.bias is not None:
            self.out_proj.bias.copy_(ref.out_proj.bias)

    def extra_repr(self) -> str:
        fused = ", fused_qkv=True" if self.fused_qkv else ""
        return f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}{fused}"

