"""Row-wise decoding of a GPT language model for continuous batching (``chatforge.decoding.StepModel``).

Rows join a running batch between steps and leave it when they end, each at its own position. The
state is :class:`~chatforge.models.gpt.model.GPTState` with the batch's keys right-aligned: a row's
real keys are the last ``next_pos`` columns of every layer's cache, ``key_mask`` is False on the columns to
their left (None while no row is padded: a lone row attends without a mask, as decoding alone), and each row's
next token takes its own position id. The prefill
is the model's own (``GPTLMHeadModel.prefill_rows``, left padding), and every step is its
``decode_step``, so a row's arithmetic is the one it gets decoding alone, with masked keys added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from chatforge.decoding import autocast_for
from chatforge.models.gpt.model import GPTLMHeadModel, GPTState
from chatforge.modules import GrowingKVCache


class GPTStepModel:
    """:class:`~chatforge.decoding.StepModel` over a :class:`GPTLMHeadModel` (``lm`` and ``generation``)."""

    def __init__(self, model: GPTLMHeadModel) -> None:
        if not isinstance(model, GPTLMHeadModel):
            raise TypeError(f"GPTStepModel drives a GPTLMHeadModel, not {type(model).__name__}")
        self.model = model
        self.max_len: int | None = None  # per row: max_steps(prompt)

    def _device(self) -> torch.device:
        return self.model.transformer.wpe.embedding.weight.device

    def max_steps(self, prompt: list[int]) -> int:
        """Tokens this prompt (ids before the model's special tokens) leaves room for, as decoding it alone
        (``GPTState.max_steps``); ValueError when it leaves none."""
        width = len(self.model.prompt_ids(prompt))
        n = self.model.cfg.n_positions
        if width >= n:
            raise ValueError(f"the prompt has {width} tokens; the model's n_positions is {n}")
        return n - width + 1

    def prefill(self, prompts: list[list[int]], bos_id: int) -> tuple[GPTState, Tensor]:
        """Prefill the prompts (the model adds its own ``<s>``/``[SEP]``; ``bos_id`` is not used) and
        feed each one's last token -> (state, logits (n, V))."""
        m = self.model
        with torch.inference_mode(), autocast_for(m):
            state = m.prefill_rows([m.prompt_ids(p) for p in prompts], self._device())
            logits = m.decode_step(state.start_tokens, state)
        return state, logits.float()

    def step(self, state: GPTState, tokens: Tensor) -> Tensor:
        m = self.model
        with torch.inference_mode(), autocast_for(m):
            return m.decode_step(tokens.to(state.next_pos.device)[:, None], state).float()

    def merge(self, a: GPTState, b: GPTState) -> GPTState:
        """Rows of ``a`` then ``b``; the narrower cache gains masked columns on its left."""
        t = max(len(a.caches[0]), len(b.caches[0]))

        def left(x: Tensor, dim: int, value: float | bool = 0.0) -> Tensor:
            extra = t - x.size(dim)
            return x if extra == 0 else F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [extra, 0], value=value)

        caches = [GrowingKVCache.from_tensors(torch.cat([left(ca.k, 2), left(cb.k, 2)]),
                                              torch.cat([left(ca.v, 2), left(cb.v, 2)]))
                  for ca, cb in zip(a.caches, b.caches, strict=True)]
        return GPTState(start_tokens=torch.cat([a.start_tokens, b.start_tokens]),
                        next_pos=torch.cat([a.next_pos, b.next_pos]),
                        key_mask=torch.cat([left(_key_mask(a), 3, False), left(_key_mask(b), 3, False)]),
                        caches=caches, history=None, pos_history=None, max_steps=min(a.max_steps, b.max_steps),
                        plan=a.plan or b.plan)

    def select(self, state: GPTState, index: Tensor) -> GPTState:
        """Keep the rows ``index``; drop the cache columns none of them needs any more, so a long reply
        that left does not keep costing."""
        state.reorder(index)
        width, need = len(state.caches[0]), int(state.next_pos.max())
        if need < width:
            state.caches = [GrowingKVCache.from_tensors(c.k[:, :, width - need:], c.v[:, :, width - need:])
                            for c in state.caches]
            if state.key_mask is not None:
                state.key_mask = state.key_mask[..., width - need:]
        if state.key_mask is not None and bool(state.key_mask.all()):
            state.key_mask = None  # no row padded: attention without a mask, as a lone request's
        return state


def _key_mask(state: GPTState) -> Tensor:
    """The state's key mask, all True when it has none (no row padded)."""
    if state.key_mask is not None:
        return state.key_mask
    return torch.ones((state.next_pos.size(0), 1, 1, len(state.caches[0])), dtype=torch.bool,
                      device=state.next_pos.device)
