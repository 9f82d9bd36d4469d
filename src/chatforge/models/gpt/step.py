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
from chatforge.modules import GrowingKVCache, apply_linear


class GPTStepModel:
    """:class:`~chatforge.decoding.StepModel` over a :class:`GPTLMHeadModel` (``lm`` and ``generation``)."""

    def __init__(self, model: GPTLMHeadModel) -> None:
        if not isinstance(model, GPTLMHeadModel):
            raise TypeError(f"GPTStepModel drives a GPTLMHeadModel, not {type(model).__name__}")
        self.model = model
        self.max_len: int | None = None  # per row: max_steps(prompt)
        # The prompt's last token in the prefill's own forward pass (one read of the weights, not two), except
        # with dynamically quantized int8 layers: they quantize a call's activations with one scale, so the last
        # token would take the whole prompt's and round differently than decoding it alone (measured: served int8
        # replies agreed with fp32 on 94.1 % of ChatbotData test tokens against 95.2 % with two passes).
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

        self._one_pass = not any(isinstance(mod, DynamicInt8Linear) for mod in model.modules())

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
            rows = [m.prompt_ids(p) for p in prompts]
            if self._one_pass:
                state, logits = m.prefill_rows(rows, self._device(), feed_last=True)
            else:
                state = m.prefill_rows(rows, self._device())
                logits = m.decode_step(state.start_tokens, state)
        return state, logits.float()

    def step(self, state: GPTState, tokens: Tensor) -> Tensor:
        m = self.model
        with torch.inference_mode(), autocast_for(m):
            return m.decode_step(tokens.to(state.next_pos.device)[:, None], state).float()

    def verify(self, state: GPTState, tokens: Tensor) -> Tensor:
        """Feed ``tokens`` (B, T) per row at its next T positions (each row's last chosen token, then its
        draft; speculative decoding) -> logits (B, T, V). The caches gain T columns; :meth:`accept` must
        follow and says how many of them each row keeps. Positions past ``n_positions`` (padding of a row
        whose draft is shorter) are clamped: the caller never keeps them."""
        m = self.model
        if m.training:
            raise RuntimeError("verify decodes in eval mode only")
        b, t = tokens.shape
        with torch.inference_mode(), autocast_for(m):
            dev = state.next_pos.device
            tokens = tokens.to(dev)
            steps = torch.arange(t, device=dev)
            pos = (state.next_pos[:, None] + steps).clamp(max=m.cfg.n_positions - 1)  # (B, T)
            width = len(state.caches[0])
            causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            mask = torch.cat([_key_mask(state).expand(b, 1, t, width), causal.expand(b, 1, t, t)], dim=-1)
            logits = m.scripted_logits(tokens, pos, mask, state.caches)
            if logits is not None:
                return logits.float()
            if state.plan is None:
                state.plan = m.transformer.decode_plan()
            h = m.transformer.decode(tokens, pos, mask, state.caches, state.plan)  # (B, T, D)
            return m._token_logits(apply_linear(m.lm_head, h)).float()

    def accept(self, state: GPTState, keep: list[int], fed: int) -> None:
        """After :meth:`verify` of ``fed`` tokens per row: row i keeps the first ``keep[i]`` (1..fed) of
        them. Columns no row keeps are cut off the caches; the others are masked for the rows that
        rejected them (the row's positions go on from its last kept token)."""
        tail = fed - max(keep)
        if tail:
            for c in state.caches:
                c.truncate(len(c) - tail)
        t = fed - tail
        width = len(state.caches[0])
        dev = state.next_pos.device
        kept = torch.tensor(keep, dtype=torch.long, device=dev)
        if min(keep) < t or state.key_mask is not None:
            old = state.key_mask if state.key_mask is not None else torch.ones(
                (len(keep), 1, 1, width - t), dtype=torch.bool, device=dev)
            new = torch.arange(t, device=dev)[None, :] < kept[:, None]  # (B, t)
            state.key_mask = torch.cat([old, new[:, None, None, :]], dim=-1)
        state.next_pos = state.next_pos + kept

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
        width = len(state.caches[0])
        if state.key_mask is not None:  # the rows' keys start at the first column any of them uses
            used = state.key_mask.reshape(state.key_mask.size(0), -1).any(0)  # (L,)
            need = width - int(used.to(torch.int8).argmax()) if bool(used.any()) else 0
        else:
            need = int(state.next_pos.max())
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
