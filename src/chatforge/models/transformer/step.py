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
            st = self.model.init_state(src, use_cache=True)
            bos = torch.full((len(prompts), 1), bos_id, dtype=torch.long, device=device)
            logits = self.model.decode_step(bos, st)  # fills the cross caches and position 0
            lens = torch.ones(len(prompts), dtype=torch.long, device=device)
            return _RowsState(st.memory, st.memory_mask, st.caches, lens), logits.float()

    def step(self, state: _RowsState, tokens: Tensor) -> Tensor:
        m = self.model
        with torch.inference_mode(), autocast_for(m):
            width = len(state.caches[0].self_attn)  # T: cached positions (right-aligned)
            # Sinusoidal positions are a fixed (max_len, D) table: one row per sequence's own position.
            y = m.dropout(m.tgt_embed(tokens[:, None]) + m.positions.table[state.lens][:, None])  # (B, 1, D)
            # After this step appends one key, key j of T+1 belongs to row i iff j >= T - lens[i].
            keys = torch.arange(width + 1, device=tokens.device)
            self_mask = (keys[None, :] >= (width - state.lens)[:, None])[:, None, None, :]  # (B, 1, 1, T+1)
            y = m.decoder(y, state.memory, self_mask=self_mask, memory_mask=state.memory_mask, cache=state.caches)
            state.lens = state.lens + 1
            return m.lm_head(y[:, 0]).float()  # (B, V)

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

        memory = torch.cat([pad_right(a.memory, s, 1), pad_right(b.memory, s, 1)])
        mask = torch.cat([pad_right(a.memory_mask, s, 3, False), pad_right(b.memory_mask, s, 3, False)])
        for ca, cb in zip(a.caches, b.caches, strict=True):
            ca.self_attn.k = torch.cat([pad_left(ca.self_attn.k, t), pad_left(cb.self_attn.k, t)])
            ca.self_attn.v = torch.cat([pad_left(ca.self_attn.v, t), pad_left(cb.self_attn.v, t)])
            ca.cross_attn.k = torch.cat([pad_right(ca.cross_attn.k, s, 2), pad_right(cb.cross_attn.k, s, 2)])
            ca.cross_attn.v = torch.cat([pad_right(ca.cross_attn.v, s, 2), pad_right(cb.cross_attn.v, s, 2)])
        return _RowsState(memory, mask, a.caches, torch.cat([a.lens, b.lens]))

    def select(self, state: _RowsState, index: Tensor) -> _RowsState:
        index = index.to(state.memory.device)
        state.memory = state.memory.index_select(0, index)
        state.memory_mask = state.memory_mask.index_select(0, index)
        state.lens = state.lens.index_select(0, index)
        for c in state.caches:
            c.reorder(index)
        # Drop columns no remaining row needs, so a long reply that left does not keep costing.
        width, need = len(state.caches[0].self_attn), int(state.lens.max())
        if need < width:
            for c in state.caches:
                c.self_attn.k = c.self_attn.k[:, :, width - need :]
                c.self_attn.v = c.self_attn.v[:, :, width - need :]
        used = state.memory_mask.reshape(state.memory_mask.size(0), -1).any(0)  # (S,)
        s_need = int(used.nonzero().max()) + 1 if bool(used.any()) else state.memory.size(1)
        if s_need < state.memory.size(1):
            state.memory = state.memory[:, :s_need]
            state.memory_mask = state.memory_mask[..., :s_need]
            for c in state.caches:
                c.cross_attn.k = c.cross_attn.k[:, :, :s_need]
                c.cross_attn.v = c.cross_attn.v[:, :, :s_need]
        return state
