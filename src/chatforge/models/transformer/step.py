"""The Transformer's row-wise decode step for continuous batching (:class:`chatforge.decoding.StepModel`).

Rows join and leave the running batch between steps, each at its own decoder position, so the
self-attention caches are right-aligned (left-padded) and masked per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from chatforge.decoding import autocast_for
from chatforge.models.transformer.model import TransformerSeq2Seq
from chatforge.modules import DecoderLayerCache


@dataclass
class _RowsState:
    memory: Tensor  # (B, S, D)
    memory_mask: Tensor  # (B, 1, 1, S)
    caches: list[DecoderLayerCache]  # per decoder layer: self k/v (B, H, T, Dh) right-aligned; cross (B, H, S, Dh)
    lens: Tensor  # (B,) decoder positions consumed per row
    # (B, 1, 1, T) True = a row's key, once columns are not each row's last ``lens`` (speculative decoding
    # masks the draft tokens a row rejected); None = row i's keys are its last lens[i] columns.
    key_mask: Tensor | None = None


def _trim(cache, width: int) -> None:
    """Keep the last ``width`` self-attention columns of a layer's cache."""
    c = cache.self_attn
    if c.k.size(2) > width:
        c.k, c.v = c.k[:, :, c.k.size(2) - width :], c.v[:, :, c.v.size(2) - width :]


def _keys(state: _RowsState, width: int | None = None) -> Tensor:
    """(B, 1, 1, T): which of the first ``width`` (default: all) self-attention columns are each row's keys."""
    if state.key_mask is not None:
        return state.key_mask
    return _right_aligned(state.lens, len(state.caches[0].self_attn) if width is None else width)


def _right_aligned(lens: Tensor, width: int) -> Tensor:
    cols = torch.arange(width, device=lens.device)
    return (cols[None, :] >= (width - lens)[:, None])[:, None, None, :]


class Seq2SeqStepModel:
    """Row-wise decoding for :class:`~chatforge.models.transformer.TransformerSeq2Seq`.

    The model's ``decode_step`` keeps one position counter for the whole batch, which is right
    for a batch that starts together but not for rows that join later. Here the prefill goes
    through the model's ``init_state``/``decode_step`` unchanged, and later steps drive the
    same decoder stack with a per-row position and a self-attention mask over right-aligned
    caches, so a row's keys never see another row's padding. With greedy decoding the tokens
    equal those of :func:`chatforge.decoding.generate` for each request alone.
    """

    def __init__(self, model: TransformerSeq2Seq) -> None:
        if not isinstance(model, TransformerSeq2Seq):
            raise TypeError(f"Seq2SeqStepModel drives a TransformerSeq2Seq, not {type(model).__name__}")
        self.model = model
        self.max_len: int | None = model.max_len

    def _device(self) -> torch.device:
        return self.model.positions.table.device  # not lm_head.weight: a method once quantized to int8

    def prefill(self, prompts: list[list[int]], bos_id: int) -> tuple[_RowsState, Tensor]:
        with torch.inference_mode(), autocast_for(self.model):
            device = self._device()
            width = max(len(p) for p in prompts)
            src = torch.full((len(prompts), width), self.model.pad_id, dtype=torch.long, device=device)
            for i, ids in enumerate(prompts):
                src[i, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
            bos = torch.full((len(prompts), 1), bos_id, dtype=torch.long, device=device)
            if (done := self.model.scripted_prefill(src, bos)) is not None:
                logits, st = done
            else:
                st = self.model.init_state(src, use_cache=True)
                logits = self.model.decode_step(bos, st)  # fills the cross caches and position 0
            lens = torch.ones(len(prompts), dtype=torch.long, device=device)
            return _RowsState(st.memory, st.memory_mask, st.caches, lens), logits.float()

    def step(self, state: _RowsState, tokens: Tensor) -> Tensor:
        m = self.model
        with torch.inference_mode(), autocast_for(m):
            if state.key_mask is None and (done := m.scripted_step_aligned(tokens, state.lens, state.memory_mask,
                                                                           state.caches)) is not None:
                logits, state.lens = done  # the mask below, built in the graph
                return logits
            width = len(state.caches[0].self_attn)  # T: cached positions (right-aligned)
            if state.key_mask is None:
                # After this step appends one key, key j of T+1 belongs to row i iff j >= T - lens[i].
                keys = torch.arange(width + 1, device=tokens.device)
                self_mask = (keys[None, :] >= (width - state.lens)[:, None])[:, None, None, :]  # (B, 1, 1, T+1)
            else:
                self_mask = state.key_mask = F.pad(state.key_mask, (0, 1), value=True)
            logits = m.scripted_logits(tokens[:, None], state.lens[:, None], self_mask, state.memory_mask,
                                       state.caches)
            if logits is not None:
                state.lens = state.lens + 1
                return logits[:, 0].float()  # (B, V)
            # Sinusoidal positions are a fixed (max_len, D) table: one row per sequence's own position.
            y = m.dropout(m.tgt_embed(tokens[:, None]) + m.positions.table[state.lens][:, None])  # (B, 1, D)
            y = m.decoder(y, state.memory, self_mask=self_mask, memory_mask=state.memory_mask, cache=state.caches)
            state.lens = state.lens + 1
            return m.lm_head(y[:, 0]).float()  # (B, V)

    def verify(self, state: _RowsState, tokens: Tensor) -> Tensor:
        """Feed ``tokens`` (B, T) per row at its next T positions (its last chosen token, then its draft;
        speculative decoding) -> logits (B, T, V); :meth:`accept` must follow. Positions past the table
        (padding of a shorter draft) are clamped: the caller never keeps them."""
        m = self.model
        b, t = tokens.shape
        with torch.inference_mode(), autocast_for(m):
            dev = state.lens.device
            tokens = tokens.to(dev)
            pos = (state.lens[:, None] + torch.arange(t, device=dev)).clamp(max=m.positions.table.size(0) - 1)
            width = len(state.caches[0].self_attn)
            causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            self_mask = torch.cat([_keys(state).expand(b, 1, t, width), causal.expand(b, 1, t, t)], dim=-1)
            logits = m.scripted_logits(tokens, pos, self_mask, state.memory_mask, state.caches)
            if logits is not None:
                return logits.float()  # (B, T, V)
            y = m.dropout(m.tgt_embed(tokens) + m.positions.table[pos])  # (B, T, D)
            y = m.decoder(y, state.memory, self_mask=self_mask, memory_mask=state.memory_mask, cache=state.caches)
            return m.lm_head(y).float()  # (B, T, V)

    def accept(self, state: _RowsState, keep: list[int], fed: int) -> None:
        """After :meth:`verify` of ``fed`` tokens per row: row i keeps the first ``keep[i]`` (1..fed) of
        them; columns no row keeps are cut off, the others masked for the rows that rejected them."""
        width = len(state.caches[0].self_attn) - fed  # before the verification
        old = _keys(state, width)
        t = max(keep)
        if fed > t:
            for c in state.caches:
                c.self_attn.k = c.self_attn.k[:, :, : width + t]
                c.self_attn.v = c.self_attn.v[:, :, : width + t]
        kept = torch.tensor(keep, dtype=torch.long, device=state.lens.device)
        if min(keep) < t or state.key_mask is not None:
            new = torch.arange(t, device=kept.device)[None, :] < kept[:, None]  # (B, t)
            state.key_mask = torch.cat([old, new[:, None, None, :]], dim=-1)
        state.lens = state.lens + kept

    def merge(self, a: _RowsState, b: _RowsState) -> _RowsState:
        s = max(a.memory.size(1), b.memory.size(1))
        t = max(len(a.caches[0].self_attn), len(b.caches[0].self_attn))

        def pad_right(x: Tensor, dim_size: int, dim: int, value: float | bool = 0.0) -> Tensor:
            extra = dim_size - x.size(dim)
            if extra == 0:
                return x
            pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
            return F.pad(x, pad, value=value)

        def pad_left(x: Tensor, dim_size: int) -> Tensor:  # x (B, H, T, Dh): new columns in front
            extra = dim_size - x.size(2)
            return x if extra == 0 else F.pad(x, [0, 0, extra, 0])

        key_mask = None
        if a.key_mask is not None or b.key_mask is not None:  # rows with masked columns: masks for all
            key_mask = torch.cat([F.pad(_keys(x), [t - len(x.caches[0].self_attn), 0], value=False) for x in (a, b)])
        memory = torch.cat([pad_right(a.memory, s, 1), pad_right(b.memory, s, 1)])
        mask = torch.cat([pad_right(a.memory_mask, s, 3, False), pad_right(b.memory_mask, s, 3, False)])
        for ca, cb in zip(a.caches, b.caches, strict=True):
            ca.self_attn.k = torch.cat([pad_left(ca.self_attn.k, t), pad_left(cb.self_attn.k, t)])
            ca.self_attn.v = torch.cat([pad_left(ca.self_attn.v, t), pad_left(cb.self_attn.v, t)])
            ca.cross_attn.k = torch.cat([pad_right(ca.cross_attn.k, s, 2), pad_right(cb.cross_attn.k, s, 2)])
            ca.cross_attn.v = torch.cat([pad_right(ca.cross_attn.v, s, 2), pad_right(cb.cross_attn.v, s, 2)])
        return _RowsState(memory, mask, a.caches, torch.cat([a.lens, b.lens]), key_mask)

    def select(self, state: _RowsState, index: Tensor) -> _RowsState:
        index = index.to(state.memory.device)
        state.memory = state.memory.index_select(0, index)
        state.memory_mask = state.memory_mask.index_select(0, index)
        state.lens = state.lens.index_select(0, index)
        for c in state.caches:
            c.reorder(index)
        # Drop columns no remaining row needs, so a long reply that left does not keep costing.
        width = len(state.caches[0].self_attn)
        if state.key_mask is not None:
            state.key_mask = state.key_mask.index_select(0, index)
            used = state.key_mask.reshape(state.key_mask.size(0), -1).any(0)  # (T,)
            need = width - int(used.to(torch.int8).argmax()) if bool(used.any()) else 0
        else:
            need = int(state.lens.max())
        if need < width:
            for c in state.caches:
                _trim(c, need)
            if state.key_mask is not None:
                state.key_mask = state.key_mask[..., width - need :]
        if state.key_mask is not None and bool((state.key_mask == _right_aligned(state.lens, need)).all()):
            state.key_mask = None  # no masked column left: back to the right-aligned fast path
        used = state.memory_mask.reshape(state.memory_mask.size(0), -1).any(0)  # (S,)
        s_need = int(used.nonzero().max()) + 1 if bool(used.any()) else state.memory.size(1)
        if s_need < state.memory.size(1):
            state.memory = state.memory[:, :s_need]
            state.memory_mask = state.memory_mask[..., :s_need]
            for c in state.caches:
                c.cross_attn.k = c.cross_attn.k[:, :, :s_need]
                c.cross_attn.v = c.cross_attn.v[:, :, :s_need]
        return state
