"""Decoding outside the models (fairseq's split): greedy, sampling and beam search over a cache interface.

A generator model implements two methods, and the same decoding code then serves
every family:

    state = model.init_state(input_ids)            # input_ids (B, S): source / prompt
    logits = model.decode_step(tokens, state)      # tokens (B, 1) -> logits (B, V); appends to the cache

``decode_step`` feeds the decoder one new token per sequence and updates ``state``
(its KV cache) in place. ``state.reorder(index)`` (select batch rows) lets batched decoding
drop finished rows. ``init_state(input_ids, use_cache=False)`` gives the uncached reference
(the whole prefix recomputed each step). A model may expose ``max_len`` (decoder positions);
decoding then stops after at most that many steps.

Decoder-only models (GPT) use the same interface: ``init_state`` prefills the prompt and puts the
prompt's last token in ``state.start_tokens`` (B, 1), which decoding feeds first instead of
``<s>``; ``state.max_steps`` (if present) caps the steps left before the model runs out of
positions. ``state.reorder`` may repeat rows, which beam search uses to fork hypotheses.

The token-choice helpers (:func:`top_k_top_p_filter`, :func:`apply_repetition_penalty`,
:func:`choose_next`) are small pure functions on logits, tested on hand-made tensors.

Continuous batching (``serving/batching.py``) drives a second, row-wise interface,
:class:`StepModel`: rows join and leave a running batch between steps, each at its own
position. A family that supports it implements it in its ``step.py`` and registers the
factory with the registry (``step_model=``); the engine drives every family the same way and
holds no family code. :func:`choose_tokens` picks each row's token under its own options.

A caller that reaches decoding through layers it cannot pass arguments through (the serving
runner over ``ReplyGenerator.stream``) opens :func:`watch_decoding` around its iteration: every
decoding loop run in that context then checks its ``should_stop`` before each step (raising
:class:`DecodingStopped`; beam search sends nothing until it ends, so this is the only way to stop
it early) and records there the number of steps the reply may take (``max_new_tokens`` capped by
the model's positions), from which the caller tells "length" from "stop".

A sampling ``seed`` (any int64) reaches torch's generator through :func:`generator_seed`, a
splitmix64 mix: torch's CPU generator keeps only the low 32 bits of the seed it is given.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

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
    seed: int | None = None  # any int64; mixed into torch's generator seed by generator_seed()
    repetition_penalty: float = 1.0
    num_beams: int = 1  # > 1: beam search (deterministic; do_sample must be false)
    length_penalty: float = 1.0  # beam scores are sum(log p) / length**length_penalty
    no_repeat_ngram_size: int = 0  # > 0: never generate an n-gram of this size twice in one reply
    # OpenAI's additive penalties on tokens of the reply so far: a logit loses frequency_penalty x its count
    # and presence_penalty once it occurred; negative values favour repeats. 0: none.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    # Limits that the API enforces; a bad value is reported with the allowed range.
    MAX_NEW_TOKENS_LIMIT = 1024
    MAX_BEAMS = 16
    MAX_NO_REPEAT_NGRAM = 16

    def validate(self) -> GenerationOptions:
        """Raise ValueError naming the field, the value and what is allowed."""
        checks = [
            ("max_new_tokens", 1 <= self.max_new_tokens <= self.MAX_NEW_TOKENS_LIMIT,
             f"an integer in [1, {self.MAX_NEW_TOKENS_LIMIT}]"),
            ("min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens,
             "an integer in [0, max_new_tokens]"),
            ("temperature", 0.0 < self.temperature <= 10.0, "a number in (0, 10]"),
            ("top_k", 0 <= self.top_k <= 100_000, "an integer in [0, 100000] (0 disables top-k)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "a number in (0, 1] (1 disables top-p)"),
            ("repetition_penalty", 1.0 <= self.repetition_penalty <= 10.0, "a number in [1, 10]"),
            ("num_beams", 1 <= self.num_beams <= self.MAX_BEAMS, f"an integer in [1, {self.MAX_BEAMS}]"),
            ("length_penalty", -5.0 <= self.length_penalty <= 5.0, "a number in [-5, 5]"),
            ("no_repeat_ngram_size", 0 <= self.no_repeat_ngram_size <= self.MAX_NO_REPEAT_NGRAM,
             f"an integer in [0, {self.MAX_NO_REPEAT_NGRAM}] (0 disables it)"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "a number in [-2, 2] (0 disables it)"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "a number in [-2, 2] (0 disables it)"),
            ("num_beams", self.num_beams == 1 or not self.do_sample,
             "1 when do_sample is true (beam search is deterministic)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; allowed: {allowed}")
        return self

    @property
    def penalised(self) -> bool:
        """True when a penalty reads the tokens generated so far (their counts must be kept)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def autocast_for(model: Any):
    """bf16 autocast when ``model``'s weights are bf16 (see ``inference.load_model``), else a no-op.

    Autocast state is per thread, so every thread that runs the model enters it; the weights
    are bf16 already, so autocast casts only activations and keeps no weight copies.
    """
    try:
        param = next(model.parameters())
    except (AttributeError, StopIteration):
        return contextlib.nullcontext()
    if param.dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=param.device.type, dtype=torch.bfloat16)


# ---- what a caller shares with the decoding that runs in its context ----


class DecodingStopped(Exception):
    """Decoding ended early because the ``should_stop`` of :func:`watch_decoding` said so (the caller went away)."""


@dataclass
class DecodingWatch:
    """A caller's view of the decoding that runs in its context (see :func:`watch_decoding`).

    ``should_stop`` (set by the caller): checked before every decoding step; when it returns True the
    loop raises :class:`DecodingStopped`, so a cancelled request costs at most one more step, beams
    included. ``max_steps`` (set by decoding): how many tokens the latest reply decoded here may take,
    ``max_new_tokens`` capped by the model's positions (``max_len``, ``state.max_steps``); a reply of
    that many tokens was cut there ("length"), a shorter one ended with </s> ("stop").
    """

    should_stop: Callable[[], bool] | None = None
    max_steps: int | None = None

    def finish_reason(self, n_tokens: int, max_new_tokens: int) -> str:
        """The finish reason of a reply of ``n_tokens``: "length" when it hit its cap (``max_steps``, else
        ``max_new_tokens`` when no decoding loop reported one, e.g. a backend of its own), else "stop"."""
        cap = self.max_steps if self.max_steps is not None else max_new_tokens
        return "length" if n_tokens >= cap else "stop"


_WATCH: contextvars.ContextVar[DecodingWatch | None] = contextvars.ContextVar("chatforge_decoding_watch",
                                                                              default=None)


@contextlib.contextmanager
def watch_decoding(should_stop: Callable[[], bool] | None = None) -> Iterator[DecodingWatch]:
    """Within the block, decoding run in this context (this thread, or a ``contextvars.Context`` it runs in)
    checks ``should_stop`` before each step and reports its step cap; yields the :class:`DecodingWatch`.

    A decoding generator reads the watch when it starts (its first ``next``), so start it inside the block.
    """
    watch = DecodingWatch(should_stop)
    token = _WATCH.set(watch)
    try:
        yield watch
    finally:
        _WATCH.reset(token)


def _stop_check(watch: DecodingWatch | None) -> Callable[[], bool] | None:
    return None if watch is None else watch.should_stop


def _check_stop(should_stop: Callable[[], bool] | None, step: int) -> None:
    if should_stop is not None and should_stop():
        raise DecodingStopped(f"decoding stopped by its caller before step {step + 1}")


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One output of Steele, Lea and Flood's SplitMix64 (2014) from state ``x``: a bijection of 64-bit integers
    whose every output bit depends on every input bit."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def generator_seed(seed: int) -> int:
    """The seed given to torch's generator for a request's ``seed`` (an int64, negative ones included).

    torch's CPU generator (mt19937) keeps only the low 32 bits of ``manual_seed``, so seeds 1 and 2**32 + 1
    (or -1 and 2**63 - 1) sampled the same reply. The seed (as 64 bits, two's complement) is mixed by
    SplitMix64 and its halves XOR-folded into the low 32 bits, which then depend on all 64: seeds that
    differ only in their high bits give different streams, and one seed always gives the same stream.
    """
    z = _splitmix64(seed & _MASK64)
    return z ^ (z >> 32)


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A torch generator on ``device`` seeded from a request's ``seed`` through :func:`generator_seed`."""
    return torch.Generator(device=device).manual_seed(generator_seed(seed))


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
        remove_sorted = mass_before >= top_p  # the first token always has mass_before == 0 ...
        remove_sorted[..., 0] = False  # ... and stays even when top_p (1e-300) rounds to 0 in float32
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


def apply_count_penalties(logits: Tensor, counts: Tensor, frequency: float, presence: float) -> Tensor:
    """OpenAI's frequency and presence penalties: ``logits - counts * frequency - (counts > 0) * presence``.

    ``counts`` is a float (B, V) tensor of how often each token occurs in the reply so far (the prompt does not
    count, as in OpenAI's API and vLLM).
    """
    if frequency == 0.0 and presence == 0.0:
        return logits
    out = logits
    if frequency != 0.0:
        out = out - counts * frequency
    if presence != 0.0:
        out = out - (counts > 0).to(logits.dtype) * presence
    return out


def apply_penalties(logits: Tensor, counts: Tensor, options: GenerationOptions) -> Tensor:
    """Every penalty of ``options`` that reads the reply so far (``counts``, float (B, V)): CTRL's repetition
    penalty, then OpenAI's frequency and presence penalties."""
    if options.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, counts > 0, options.repetition_penalty)
    return apply_count_penalties(logits, counts, options.frequency_penalty, options.presence_penalty)


def banned_ngram_tokens(history: list[int], n: int) -> list[int]:
    """The tokens that would complete an n-gram already in ``history`` (the reply so far): those that
    followed each earlier occurrence of its last ``n - 1`` tokens. ``n`` 0 bans nothing; 1 bans every
    token already generated (as ``no_repeat_ngram_size`` in Hugging Face's generate)."""
    if n <= 0 or len(history) < n - 1:
        return []
    if n == 1:
        return list(set(history))
    prefix = history[len(history) - n + 1:]
    return [history[i + n - 1] for i in range(len(history) - n + 1) if history[i:i + n - 1] == prefix]


def block_repeated_ngrams(logits: Tensor, histories: list[list[int]], n: int) -> Tensor:
    """Set to -inf, in place, each row's tokens that would repeat an n-gram of that row's history."""
    for i, history in enumerate(histories):
        banned = banned_ngram_tokens(history, n)
        if banned:
            logits[i, banned] = float("-inf")
    return logits


def choose_next(logits: Tensor, options: GenerationOptions, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row from logits (B, V): argmax, or a sample after temperature/top-k/top-p."""
    if not options.do_sample:
        return logits.argmax(-1)
    # Any temperature in (0, 10] is valid; a tiny one (1e-30) overflows float32 logits / t to inf and
    # softmax(inf - inf) is NaN, so scale in float64 (range 1e308): the sample is then the argmax.
    # Below about 1e-306 (the HTTP surface takes any float64, down to 5e-324) even float64 overflows:
    # the row's maximum is subtracted first, so the best logit scales to 0 and the others to at most
    # 0 (-inf at worst), which cannot be NaN.
    wide = options.temperature < 1e-3
    if wide:
        wide_logits = logits.double()
        scaled = (wide_logits - wide_logits.amax(-1, keepdim=True)) / options.temperature
    else:
        scaled = logits / options.temperature
    filtered = top_k_top_p_filter(scaled, options.top_k, options.top_p)
    probs = filtered.softmax(-1, dtype=torch.float64 if wide else torch.float32)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- the decoding loop ----


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _check_inputs(batch: list[list[int]]) -> None:
    if not batch:
        raise ValueError("the batch is empty; pass at least one input sequence")
    for i, ids in enumerate(batch):
        if len(ids) == 0:
            raise ValueError(f"input sequence {i} is empty; each source needs at least one token")


def _pad_batch(batch: list[list[int]], pad_id: int, device: torch.device) -> Tensor:
    _check_inputs(batch)
    width = max(len(ids) for ids in batch)
    out = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
    for i, ids in enumerate(batch):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
    return out


class _NoAutograd:
    """Autograd off for one resumption of a decoding generator, chosen by the caller's autocast.

    Normally inference mode. Under autocast it is ``no_grad`` with inference mode switched off
    instead: autocast keeps its low-precision copies of the weights (its cast cache) only outside
    inference mode, and without them every step re-casts every weight matrix, which made bf16
    decoding at batch 1 slower than fp32. The copies then live until the caller's outermost autocast
    exits, i.e. for the whole reply when the caller wraps decoding in autocast. The numbers are the
    same either way: a cached cast is the same cast.
    """

    __slots__ = ("_device_type", "_modes")

    def __init__(self, device_type: str):
        self._device_type = device_type
        self._modes: tuple = ()

    def __enter__(self) -> None:
        if torch.is_autocast_enabled(self._device_type):
            self._modes = (torch.inference_mode(False), torch.no_grad())
        else:
            self._modes = (torch.inference_mode(),)
        for m in self._modes:
            m.__enter__()

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)


def _decode(model: Any, src: Tensor, options: GenerationOptions, bos_id: int, eos_id: int,
            use_cache: bool) -> Iterator[tuple[list[int], list[int]]]:
    """Yield, per step, (original row indices still running, their chosen tokens) — eos included.

    Autograd is turned off around each resumption of the step generator (not by a ``with`` around
    the loop), so the mode never leaks to the caller between tokens, and a generator resumed from
    different executor threads stays correct.
    """
    steps = _decode_steps(model, src, options, bos_id, eos_id, use_cache)
    mode = _NoAutograd(src.device.type)
    while True:
        with mode:
            try:
                item = next(steps)
            except StopIteration:
                return
        yield item


def _decode_steps(model: Any, src: Tensor, options: GenerationOptions, bos_id: int, eos_id: int,
                  use_cache: bool) -> Iterator[tuple[list[int], list[int]]]:
    options.validate()
    if getattr(model, "training", False):
        logger.warning("decoding a model in training mode (dropout active); call model.eval() first")
    watch = _WATCH.get()
    should_stop = _stop_check(watch)
    generator = None
    if options.do_sample and options.seed is not None:
        generator = seeded_generator(options.seed, src.device)

    state = model.init_state(src, use_cache=use_cache)
    max_steps = _step_limit(model, state, options, watch)
    # Batch-1 decoding is bound by per-step overhead, so the bookkeeping stays in Python lists and
    # the (B, V) ``counts`` exist only when a penalty needs them.
    active = list(range(src.size(0)))  # original row of each state row
    tokens = _start_tokens(state, src, bos_id)
    penalised = options.penalised
    counts: Tensor | None = None  # (B, V) how often each token was generated so far, for the penalties
    ngram = options.no_repeat_ngram_size
    histories: list[list[int]] = [[] for _ in active] if ngram else []  # each row's reply so far
    for step in range(max_steps):
        _check_stop(should_stop, step)
        logits = model.decode_step(tokens, state).float()  # (b, V)
        if penalised:
            if counts is None:
                counts = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
            logits = apply_penalties(logits, counts, options)
        if ngram:
            block_repeated_ngrams(logits, histories, ngram)
        if step < options.min_new_tokens:
            logits[:, eos_id] = float("-inf")
        nxt = choose_next(logits, options, generator)  # (b,)
        chosen = nxt.tolist()
        for history, token in zip(histories, chosen, strict=False):
            history.append(token)
        yield active, chosen
        if step == max_steps - 1:
            break
        if counts is not None:
            counts[torch.arange(nxt.size(0), device=nxt.device), nxt] += 1
        if eos_id in chosen:
            keep_rows = [i for i, t in enumerate(chosen) if t != eos_id]
            if not keep_rows:
                break
            # Finished rows leave the batch, so they cost nothing in later steps.
            keep = torch.tensor(keep_rows, dtype=torch.long, device=nxt.device)
            state.reorder(keep)
            active = [active[i] for i in keep_rows]
            if histories:
                histories = [histories[i] for i in keep_rows]
            nxt = nxt[keep]
            if counts is not None:
                counts = counts[keep]
        tokens = nxt.unsqueeze(1)


def _start_tokens(state: Any, src: Tensor, bos_id: int) -> Tensor:
    """(B, 1) first tokens: the prompt's last token for decoder-only models, else <s>."""
    start = getattr(state, "start_tokens", None)
    if start is not None:
        return start
    return torch.full((src.size(0), 1), bos_id, dtype=torch.long, device=src.device)


def _cap_steps(state: Any, max_steps: int) -> int:
    left = getattr(state, "max_steps", None)
    if left is not None and left < max_steps:
        logger.debug("max_new_tokens=%d capped to the %d positions the model has left", max_steps, left)
        return max(1, left)
    return max_steps


def _step_limit(model: Any, state: Any, options: GenerationOptions, watch: DecodingWatch | None) -> int:
    """The most tokens this reply may take: ``max_new_tokens`` capped by the model's ``max_len`` and the
    positions ``state`` has left (every decoding path uses this one cap); reported to ``watch``."""
    max_steps = options.max_new_tokens
    max_len = getattr(model, "max_len", None)
    if max_len is not None and max_steps > max_len:
        logger.debug("max_new_tokens=%d capped to the model's max_len=%d", max_steps, max_len)
        max_steps = max_len
    max_steps = _cap_steps(state, max_steps)
    if watch is not None:
        watch.max_steps = max_steps
    return max_steps


def beam_search(model: Any, input_ids: list[int], options: GenerationOptions, *, bos_id: int, eos_id: int,
                use_cache: bool = True) -> list[int]:
    """Beam search (as in Sutskever et al. 2014; length penalty as in Wu et al. 2016, section 7)
    for one source; returns the best hypothesis's tokens (without <s>/</s>).

    Each step expands every live beam, keeps the ``num_beams`` best non-finished continuations by
    summed log-probability, and moves hypotheses ending in </s> to a finished list scored
    ``sum(log p) / length**length_penalty`` (length counts the generated tokens, </s> included).
    Search stops when ``num_beams`` hypotheses have finished and no live beam can beat the worst of
    them at the current length (HF's ``early_stopping=False`` rule), or at ``max_new_tokens``,
    where live beams are scored as they stand. ``min_new_tokens`` and the repetition penalty apply.

    Inside :func:`watch_decoding`, ``should_stop`` is checked before every step (raising
    :class:`DecodingStopped`) and the step cap is reported: the search sends nothing until it ends, so
    this is how a caller that went away stops it within one step.
    """
    options.validate()
    device = _model_device(model)
    with _NoAutograd(device.type):
        return _beam_search(model, input_ids, options, bos_id, eos_id, use_cache, device)


def _beam_search(model: Any, input_ids: list[int], options: GenerationOptions, bos_id: int, eos_id: int,
                 use_cache: bool, device: torch.device) -> list[int]:
    k = options.num_beams
    watch = _WATCH.get()
    should_stop = _stop_check(watch)
    src = _pad_batch([list(input_ids)], pad_id=0, device=device)
    state = model.init_state(src, use_cache=use_cache)
    max_steps = _step_limit(model, state, options, watch)
    tokens = _start_tokens(state, src, bos_id).repeat(k, 1)  # (K, 1)
    state.reorder(torch.zeros(k, dtype=torch.long, device=device))  # K copies of the one source
    # Only beam 0 is live at first, so the K copies do not yield K identical hypotheses.
    scores = torch.full((k,), float("-inf"), device=device)
    scores[0] = 0.0
    seqs: list[list[int]] = [[] for _ in range(k)]
    finished: list[tuple[float, list[int]]] = []
    lp = options.length_penalty

    def norm(score: float, length: int) -> float:
        return score / (length**lp)

    for step in range(max_steps):
        _check_stop(should_stop, step)
        logits = model.decode_step(tokens, state).float()  # (K, V)
        if options.penalised:
            counts = torch.zeros(logits.shape, dtype=logits.dtype, device=device)
            for i, s in enumerate(seqs):
                if s:
                    counts[i].index_add_(0, torch.tensor(s, device=device), torch.ones(len(s), device=device))
            logits = apply_penalties(logits, counts, options)
        if options.no_repeat_ngram_size:
            block_repeated_ngrams(logits, seqs, options.no_repeat_ngram_size)
        if step < options.min_new_tokens:
            logits[:, eos_id] = float("-inf")
        logp = logits.log_softmax(-1) + scores[:, None]  # (K, V)
        vocab = logp.size(-1)
        top = torch.topk(logp.view(-1), min(2 * k, logp.numel()))
        nxt: list[tuple[float, int, int]] = []  # (score, beam, token)
        for score, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            beam, tok = divmod(idx, vocab)
            if score == float("-inf"):
                break
            if tok == eos_id:
                finished.append((norm(score, step + 1), seqs[beam]))
            elif len(nxt) < k:
                nxt.append((score, beam, tok))
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:k]
        if not nxt:
            break
        if len(finished) >= k and norm(nxt[0][0], step + 1) <= finished[-1][0]:
            break
        if step == max_steps - 1:
            finished.extend((norm(sc, step + 1), seqs[b] + [t]) for sc, b, t in nxt)
            break
        beams = torch.tensor([b for _, b, _ in nxt], dtype=torch.long, device=device)
        state.reorder(beams)
        seqs = [seqs[b] + [t] for _, b, t in nxt]
        scores = torch.tensor([sc for sc, _, _ in nxt], device=device)
        tokens = torch.tensor([[t] for _, _, t in nxt], dtype=torch.long, device=device)
        k = len(nxt)
    if not finished:
        return []
    return max(finished, key=lambda f: f[0])[1]


def generate_stream(model: Any, input_ids: list[int], options: GenerationOptions, *, bos_id: int,
                    eos_id: int, use_cache: bool = True) -> Iterator[int]:
    """Yield generated token ids one at a time, as each is produced (without <s> and </s>).

    Stops at ``eos_id`` or after ``options.max_new_tokens``; </s> is suppressed until
    ``options.min_new_tokens`` tokens exist. Greedy unless ``options.do_sample``; a set
    ``options.seed`` (any int64, mapped by :func:`generator_seed`) makes sampling reproducible.

    The work starts at the first ``next()`` (beam search too), so a :func:`watch_decoding` around the
    iteration sees it: it can stop it between steps and learns the step cap.
    """
    # Validate eagerly (this is not itself a generator) so bad input fails at the call, not at next().
    options.validate()
    if options.num_beams > 1:
        _check_inputs([list(input_ids)])
        # A beam's prefix can still change until the search ends, so the best one is sent at the end.
        return _beam_stream(model, input_ids, options, bos_id, eos_id, use_cache)
    src = _pad_batch([list(input_ids)], pad_id=0, device=_model_device(model))  # one row: no padding
    return _first_row(_decode(model, src, options, bos_id, eos_id, use_cache), eos_id)


def _beam_stream(model: Any, input_ids: list[int], options: GenerationOptions, bos_id: int, eos_id: int,
                 use_cache: bool) -> Iterator[int]:
    # A generator, so the search runs at the first next(), inside the consumer's watch_decoding.
    yield from beam_search(model, input_ids, options, bos_id=bos_id, eos_id=eos_id, use_cache=use_cache)


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
    if options.num_beams > 1:
        return [beam_search(model, ids, options, bos_id=bos_id, eos_id=eos_id, use_cache=use_cache) for ids in batch]
    src = _pad_batch([list(ids) for ids in batch], pad_id=pad_id, device=_model_device(model))
    out: list[list[int]] = [[] for _ in batch]
    for rows, toks in _decode(model, src, options, bos_id, eos_id, use_cache):
        for row, tok in zip(rows, toks, strict=True):
            if tok != eos_id:
                out[row].append(tok)
    return out


# ---- the row-wise step interface of continuous batching ----


@dataclass
class StepSpec:
    """Everything continuous batching needs from a generator (``ReplyGenerator.step_spec()``)."""

    model: StepModel
    encode: Callable[[str], list[int]]  # text -> prompt ids (not truncated: the engine checks limits)
    new_detokenizer: Callable[[], Any]  # -> object with feed(token_id) -> text delta
    bos_id: int
    eos_id: int
    unk_id: int
    drafts: Any = None  # chatforge.drafts.DraftIndex of the bundle's training replies, for speculative decoding


class StepModel(Protocol):
    """What continuous batching needs from a generation model (e.g. ``models/transformer/step.py``)."""

    max_len: int | None

    def prefill(self, prompts: list[list[int]], bos_id: int) -> tuple[Any, Any]:
        """Encode ``prompts`` and run the first decoder step; -> (state, logits (n, V))."""

    def step(self, state: Any, tokens: Any) -> Any:
        """Feed one token per row, tokens (B,) -> logits (B, V); updates ``state``."""

    def merge(self, a: Any, b: Any) -> Any:
        """Concatenate two states along the batch (rows of ``a`` first)."""

    def select(self, state: Any, index: Any) -> Any:
        """Keep the rows ``index`` (a LongTensor) of ``state``."""


def choose_tokens(logits: Tensor, rows: list[Any], eos_id: int,
                  failed: dict[int, BaseException] | None = None) -> list[int]:
    """Pick each row's next token under its own options (greedy rows in one argmax).

    ``rows`` are the batch's requests, one per logits row, each with ``options``
    (:class:`GenerationOptions`), ``generated`` (tokens so far), ``history`` (their ids, kept by rows with
    ``no_repeat_ngram_size``), and the per-row ``counts`` (V,) of its generated tokens and ``rng`` generator, which this function
    creates on first use.

    Per-row Python work is limited to rows that need it (repetition penalty, sampling): the
    common case (greedy, min_new_tokens) costs a fixed number of tensor ops per step, whatever
    the batch size.

    ``failed``: where a row's own work (its penalty, banned n-grams or sampling) raises, the error is
    recorded there under the row's index (its token is then meaningless) instead of raised, so a batch
    of many requests loses only the row whose options broke it; None raises.
    """

    def row_failed(i: int, e: Exception) -> bool:
        if failed is None:
            return False
        failed[i] = e
        return True

    for i, r in enumerate(rows):
        o = r.options
        try:
            if o.penalised:
                if r.counts is None:  # only penalised rows keep (V,) counts of their generated tokens
                    r.counts = torch.zeros(logits.size(-1), dtype=logits.dtype, device=logits.device)
                logits[i : i + 1] = apply_penalties(logits[i : i + 1], r.counts[None], o)
            if o.no_repeat_ngram_size:
                banned = banned_ngram_tokens(r.history, o.no_repeat_ngram_size)
                if banned:
                    logits[i, banned] = float("-inf")
        except Exception as e:
            if not row_failed(i, e):
                raise
    no_eos = [i for i, r in enumerate(rows) if r.generated < r.options.min_new_tokens]
    if len(no_eos) == len(rows):
        logits[:, eos_id] = float("-inf")
    elif no_eos:
        logits[torch.tensor(no_eos, dtype=torch.long, device=logits.device), eos_id] = float("-inf")
    out = logits.argmax(-1).tolist()
    for i, r in enumerate(rows):
        if r.options.do_sample and (failed is None or i not in failed):
            try:
                if r.rng is None and r.options.seed is not None:
                    r.rng = seeded_generator(r.options.seed, logits.device)
                out[i] = int(choose_next(logits[i : i + 1], r.options, r.rng)[0])
            except Exception as e:
                if not row_failed(i, e):
                    raise
    return out
