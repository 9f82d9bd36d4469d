"""Decoding outside the models (fairseq's split): greedy and sampling over a cache interface.

A generator model implements two methods, and the same decoding code then serves
every family:

    state = model.init_state(input_ids)            # input_ids (B, S): source / prompt
    logits = model.decode_step(tokens, state)      # tokens (B, 1) -> logits (B, V); appends to the cache

``decode_step`` feeds the decoder one new token per sequence and updates ``state``
(its KV cache) in place. ``state.reorder(index)`` (select batch rows) lets batched decoding
drop finished rows. ``init_state(input_ids, use_cache=False)`` gives the uncached reference
(the whole prefix recomputed each step). A model may expose ``max_len`` (decoder positions);
decoding then stops after at most that many steps.

The token-choice helpers (:func:`top_k_top_p_filter`, :func:`apply_repetition_penalty`,
:func:`choose_next`) are small pure functions on logits, tested on hand-made tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass
class GenerationOptions:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1.0 = no nucleus filtering
    seed: int | None = None
    repetition_penalty: float = 1.0

    # Limits that the API enforces; a bad value is reported with the allowed range.
    MAX_NEW_TOKENS_LIMIT = 1024

    def validate(self) -> GenerationOptions:
        """Raise ValueError naming the field, the value and what is allowed."""
        checks = [
            ("max_new_tokens", 1 <= self.max_new_tokens <= self.MAX_NEW_TOKENS_LIMIT,
             f"an integer in [1, {self.MAX_NEW_TOKENS_LIMIT}]"),
            ("min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens,
             "an integer in [0, max_new_tokens]"),
            ("temperature", 0.0 < self.temperature <= 10.0, "a number in (0, 10]"),
            ("top_k", 0 <= self.top_k <= 100_000, "an integer >= 0 (0 disables top-k)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "a number in (0, 1] (1 disables top-p)"),
            ("repetition_penalty", 1.0 <= self.repetition_penalty <= 10.0, "a number in [1, 10]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; allowed: {allowed}")
        return self


# ---- pure helpers on logits ----


def top_k_top_p_filter(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Return a copy of ``logits`` (..., V) with tokens outside top-k / the nucleus set to -inf.

    top-k keeps the k highest logits (ties with the k-th are kept); top-p (Holtzman et al. 2020,
    "The Curious Case of Neural Text Degeneration", section 3.1) keeps the smallest prefix of the
    tokens sorted by probability whose mass reaches ``top_p`` (always at least one token).
    ``top_k=0`` and ``top_p=1.0`` disable the respective filter.
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_k={top_k} must be >= 0 and top_p={top_p} in (0, 1]")
    out = logits.clone()
    if top_k > 0 and top_k < out.size(-1):
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (..., 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of strictly better tokens
        remove_sorted = mass_before >= top_p  # the first token always has mass_before == 0
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        out = out.masked_fill(remove, float("-inf"))
    return out


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019, section 4.1) on already generated tokens.

    ``seen`` is a bool (B, V) mask of tokens generated so far. Positive logits are divided by
    ``penalty`` and negative ones multiplied, so a seen token always becomes less likely.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def choose_next(logits: Tensor, options: GenerationOptions, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row from logits (B, V): argmax, or a sample after temperature/top-k/top-p."""
    if not options.do_sample:
        return logits.argmax(-1)
    filtered = top_k_top_p_filter(logits / options.temperature, options.top_k, options.top_p)
    probs = filtered.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- the decoding loop ----


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _pad_batch(batch: list[list[int]], pad_id: int, device: torch.device) -> Tensor:
    if not batch:
        raise ValueError("the batch is empty; pass at least one input sequence")
    for i, ids in enumerate(batch):
        if len(ids) == 0:
            raise ValueError(f"input sequence {i} is empty; each source needs at least one token")
    width = max(len(ids) for ids in batch)
    out = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
    for i, ids in enumerate(batch):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
    return out


@torch.inference_mode()
def _decode(model: Any, src: Tensor, options: GenerationOptions, bos_id: int, eos_id: int,
            use_cache: bool) -> Iterator[tuple[list[int], list[int]]]:
    """Yield, per step, (original row indices still running, their chosen tokens) — eos included.

    Decorating the generator (not a ``with`` inside it) makes torch enter/exit inference mode
    around each resumption, so the mode never leaks to the caller between tokens, and a
    generator resumed from different executor threads stays correct.
    """
    options.validate()
    if getattr(model, "training", False):
        logger.warning("decoding a model in training mode (dropout active); call model.eval() first")
    max_steps = options.max_new_tokens
    max_len = getattr(model, "max_len", None)
    if max_len is not None and max_steps > max_len:
        logger.debug("max_new_tokens=%d capped to the model's max_len=%d", max_steps, max_len)
        max_steps = max_len
    generator = None
    if options.do_sample and options.seed is not None:
        generator = torch.Generator(device=src.device).manual_seed(options.seed)

    state = model.init_state(src, use_cache=use_cache)
    active = torch.arange(src.size(0), device=src.device)  # original row of each state row
    tokens = torch.full((src.size(0), 1), bos_id, dtype=torch.long, device=src.device)
    seen: Tensor | None = None  # (B, V) tokens generated so far, for the repetition penalty
    for step in range(max_steps):
        logits = model.decode_step(tokens, state).float()  # (b, V)
        if seen is None:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
        if step < options.min_new_tokens:
            logits[:, eos_id] = float("-inf")
        nxt = choose_next(logits, options, generator)  # (b,)
        yield active.tolist(), nxt.tolist()
        if step == max_steps - 1:
            break
        seen[torch.arange(nxt.size(0), device=nxt.device), nxt] = True
        done = nxt == eos_id
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            # Finished rows leave the batch, so they cost nothing in later steps.
            state.reorder(keep)
            active, nxt, seen = active[keep], nxt[keep], seen[keep]
        tokens = nxt.unsqueeze(1)


def generate_stream(model: Any, input_ids: list[int], options: GenerationOptions, *, bos_id: int,
                    eos_id: int, use_cache: bool = True) -> Iterator[int]:
    """Yield generated token ids one at a time, as each is produced (without <s> and </s>).

    Stops at ``eos_id`` or after ``options.max_new_tokens``; </s> is suppressed until
    ``options.min_new_tokens`` tokens exist. Greedy unless ``options.do_sample``; a set
    ``options.seed`` makes sampling reproducible.
    """
    # Validate eagerly (this is not itself a generator) so bad input fails at the call, not at next().
    options.validate()
    src = _pad_batch([list(input_ids)], pad_id=0, device=_model_device(model))  # one row: no padding
    return _first_row(_decode(model, src, options, bos_id, eos_id, use_cache), eos_id)


def _first_row(steps: Iterator[tuple[list[int], list[int]]], eos_id: int) -> Iterator[int]:
    for _, toks in steps:
        if toks[0] == eos_id:
            return
        yield toks[0]


def generate(model: Any, input_ids: list[int], options: GenerationOptions, *, bos_id: int, eos_id: int,
             use_cache: bool = True) -> list[int]:
    """All of :func:`generate_stream` as a list."""
    return list(generate_stream(model, input_ids, options, bos_id=bos_id, eos_id=eos_id, use_cache=use_cache))


def generate_batch(model: Any, batch: list[list[int]], options: GenerationOptions, *, bos_id: int,
                   eos_id: int, pad_id: int, use_cache: bool = True) -> list[list[int]]:
    """Decode several sources together (right-padded with ``pad_id``); one token list per source.

    Rows that emit </s> are dropped from the running batch (``state.reorder``). With greedy
    decoding the result equals decoding each source alone.
    """
    options.validate()
    src = _pad_batch([list(ids) for ids in batch], pad_id=pad_id, device=_model_device(model))
    out: list[list[int]] = [[] for _ in batch]
    for rows, toks in _decode(model, src, options, bos_id, eos_id, use_cache):
        for row, tok in zip(rows, toks, strict=True):
            if tok != eos_id:
                out[row].append(tok)
    return out
