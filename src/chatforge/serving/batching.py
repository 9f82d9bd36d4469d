"""Schedulers that run model work off the event loop and batch concurrent requests. No grpc here.

Three runners, one per hosted model, each with its own thread(s) and bounded queue:

* :class:`ContinuousBatcher` — generation by *iteration-level scheduling* (Yu et al. 2022,
  "Orca: A Distributed Serving System for Transformer-Based Generative Models", section 3.1):
  sequences join and leave the running batch between decoding steps, each with its own
  sampling options (temperature, top-k, top-p, repetition penalty, seed). New sequences are
  *prefilled* as a group (encoder + first decoder step, through the model's own
  ``init_state``/``decode_step``), then merged into the running batch, whose rows sit at
  different decoder positions: the self-attention caches are right-aligned (left-padded) and
  masked per row, positions are looked up per row.
* :class:`ThreadedRunner` — the fallback for generators without a step-wise model (fakes,
  families whose state this module does not know): one worker thread per running request
  over ``ReplyGenerator.stream``, with the same queue limits and counters.
* :class:`MicroBatcher` — classification by dynamic micro-batching (Triton's dynamic batcher):
  the first request opens a batch, which closes when ``max_batch_size`` texts are in or
  ``max_wait_ms`` have passed, and runs as one forward pass. The default window is 0 (natural
  batching): a free model takes whatever is queued at once, and requests that arrive during a
  forward pass form the next batch. A window only delays a lone caller: measured through real
  servers, 2 ms made one caller's call 7.5 ms instead of 4.4 and gave 32 callers no more texts/s
  (benchmarks/results/served-classification-rerun and -wait0).

Every runner rejects work at once (:class:`OverloadedError`) when its queue is full, drops
requests whose consumer went away (cancel, deadline) before or between steps, and reports
through :class:`RunnerStats` and an optional metrics object (the hooks of
:class:`chatforge.serving.metrics.ServingMetrics`).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from chatforge.context import request_id_var
from chatforge.decoding import (  # noqa: F401  (StepSpec: re-exported)
    DecodingStopped,
    StepModel,
    StepSpec,
    choose_tokens,
    watch_decoding,
)
from chatforge.drafts import DraftIndex
from chatforge.inference import TokenDelta

logger = logging.getLogger(__name__)


class OverloadedError(Exception):
    """The runner's queue is full; the engine turns this into its own overload error."""


class RunnerClosedError(Exception):
    """The runner was closed before the request could run."""


# --------------------------------------------------------------------------- bookkeeping


class RunnerStats:
    """Counters of one engine, shared by its runners, with a condition to wait on.

    ``dropped`` counts requests removed because their consumer went away (client cancel or
    deadline), from the queue or from the running batch.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.waiting = 0
        self.running = 0
        self.completed = 0
        self.dropped = 0
        self.failed = 0
        self.rejected = 0
        self.abandoned = 0  # consumers that went away before their request ended
        self.steps = 0
        self.batches = 0
        self.max_batch_seen = 0
        self.draft_tokens = 0  # speculative decoding: draft tokens verified, and how many the model agreed with
        self.accepted_tokens = 0

    def update(self, **deltas: int) -> None:
        with self.cond:
            for name, d in deltas.items():
                setattr(self, name, getattr(self, name) + d)
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[RunnerStats], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout=timeout)

    def snapshot(self) -> dict[str, int]:
        with self.cond:
            return {k: v for k, v in vars(self).items() if isinstance(v, int)}


class _NullMetrics:
    """Stands in when no metrics object is given; every hook is a no-op."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


NULL_METRICS = _NullMetrics()


@dataclass(eq=False)
class GenRequest:
    """One generation request as the runners see it.

    ``emit(kind, payload)`` is called from the runner's thread: ("start", prompt_tokens),
    ("token", TokenDelta), ("end", finish_reason), ("error", exception). Optionally ``sink``
    (an object with ``post_many([(fn, arg), ...]) -> bool``, e.g. the engine's ``LoopSink``)
    and ``deliver`` (``deliver((kind, payload))`` on the consumer's side): the continuous
    batcher then hands a whole decoding step to each sink in one call instead of one ``emit``
    per token. ``cancelled`` is set by the consumer when it goes away. ``context`` is the submitter's contextvars (request
    id) so that log lines written on the runner's thread carry it.
    """

    text: str
    prompt_ids: list[int]
    options: Any  # chatforge.decoding.GenerationOptions
    emit: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    enqueued: float = field(default_factory=time.perf_counter)
    detok: Any = None  # incremental detokenizer (batched path)
    prompt_tokens: int = 0
    turns: tuple[str, ...] = ()  # earlier turns of the conversation the model reads (oldest first)
    # runtime state of the batched path
    generated: int = 0
    max_steps: int = 0
    last_token: int = 0
    counts: Any = None  # (V,) float tensor: how often each token was generated, for the penalties
    history: list[int] = field(default_factory=list)  # generated ids, for no_repeat_ngram_size only
    draft_node: int | None = None  # speculative decoding: where the reply so far is in the DraftIndex's trie
    draft_tail: tuple[int, ...] = ()  # and its last tokens (the DraftIndex's n-gram context)
    rng: Any = None  # torch.Generator when sampling with a seed
    finished: bool = False
    sink: Any = None
    deliver: Callable[[tuple[str, Any]], None] | None = None


def _log(req: GenRequest, level: int, msg: str, *args: Any, exc_info: BaseException | None = None,
         **extra: Any) -> None:
    # Run inside the request's context so formatters that read the request-id contextvar see it.
    req.context.run(partial(logger.log, level, msg, *args, exc_info=exc_info, extra=extra))


def _log_batch_failure(reqs: list, msg: str, *args: Any, exc_info: BaseException) -> None:
    """The ERROR line (with the traceback) of a failure shared by a batch, naming its calls: ``request_ids``
    always, and a lone request's ids as the line's own (its context), so the traceback is found from the failed
    call's request id; the runner's thread has no request context of its own."""
    ids = [r.context.get(request_id_var) for r in reqs]
    if len(reqs) == 1:
        _log(reqs[0], logging.ERROR, msg, *args, exc_info=exc_info, request_ids=ids)
    else:
        logger.error(msg, *args, exc_info=exc_info, extra={"request_ids": ids})


# --------------------------------------------------------------------------- runners


class _Runner:
    """Shared queue/limit/close logic of the runners."""

    kind = "runner"

    def __init__(self, name: str, *, max_running: int, max_queued: int, stats: RunnerStats,
                 metrics: Any = None, on_error: Callable[[BaseException], None] | None = None,
                 threads: tuple[int, int] | None = None) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError(
                f"max_running={max_running!r}, max_queued={max_queued!r} are out of range; "
                "allowed: max_running >= 1, max_queued >= 0"
            )
        self.name, self.max_running, self.max_queued = name, max_running, max_queued
        self.stats = stats
        self.metrics = metrics or NULL_METRICS
        self.on_error = on_error
        self._cond = threading.Condition()
        self._waiting: deque = deque()
        self._closed = False
        self._draining = False
        self.running = 0  # this runner's own count (stats hold the engine's totals)
        # torch intra-op threads of this runner's calls: (for a call of one row, for more rows); None leaves them.
        # A classifier's batches may use every CPU while single texts leave one to the event loop
        # (runtime.runner_threads; torch's count is process-wide, so only where no decoding runner shares it).
        self.threads = threads

    def _use_threads(self, rows: int) -> None:
        """Size torch's pool for a call of ``rows`` rows (see ``threads``)."""
        if self.threads is not None:
            n = self.threads[0] if rows <= 1 else self.threads[1]
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._waiting and self.running == 0

    def _enqueue(self, item: Any) -> None:
        with self._cond:
            if self._closed or self._draining:
                raise RunnerClosedError(f"model {self.name!r} is shutting down")
            # Free batch slots absorb requests that the scheduler has not admitted yet.
            free = max(0, self.max_running - self.running)
            if len(self._waiting) >= self.max_queued + free:
                self.stats.update(rejected=1)
                raise OverloadedError(
                    f"model {self.name!r} is overloaded: {self.running} running and {len(self._waiting)} queued "
                    f"(limits: {self.max_running} running, {self.max_queued} queued); retry with backoff"
                )
            self._waiting.append(item)
            self.stats.update(waiting=1)
            self.metrics.request_queued(self.name)
            self._cond.notify_all()

    def _dequeue(self, fits: Callable[[list, Any], bool]) -> list:
        """Under ``self._cond``: move waiting requests to running while ``fits(taken, next)``.

        The one admission loop of every runner: each request leaves the queue (counters and
        queue-time metric), one whose consumer already went away is dropped instead of run,
        and the taken ones count as running.
        """
        taken: list = []
        now = time.perf_counter()
        while self._waiting and fits(taken, self._waiting[0]):
            req = self._waiting.popleft()
            self.stats.update(waiting=-1)
            self.metrics.request_dequeued(self.name, now - req.enqueued)
            if req.cancelled.is_set():
                self.stats.update(dropped=1)
                _log(req, logging.INFO, "request dropped before it ran", model=self.name, outcome="dropped")
                continue
            taken.append(req)
        if taken:
            self.running += len(taken)
            self.stats.update(running=len(taken))
        return taken

    def withdraw(self, item: Any) -> bool:
        """Take back a waiting request whose consumer went away (deadline, cancel); True if it was waiting.

        Its queue place is free at once: left in the queue until a running request finished (the admission loop
        drops it then), it made the model refuse new requests as overloaded while nobody waited, and counted
        as waiting in the engine's stats and the metrics."""
        with self._cond:
            try:
                self._waiting.remove(item)  # requests compare by identity (eq=False)
            except ValueError:
                return False  # running, finished or never queued: the runner sees ``cancelled`` itself
            self.stats.update(waiting=-1, dropped=1)
            self.metrics.request_dequeued(self.name, time.perf_counter() - item.enqueued)
            self._cond.notify_all()
        _log(item, logging.INFO, "request dropped before it ran", model=self.name, outcome="dropped")
        return True

    def _observe_batch(self, size: int) -> None:
        self.metrics.batch(self.name, size)
        with self.stats.cond:
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, size)

    def drain(self) -> None:
        """Take no new work; what is queued or running finishes (hot swap: the old version)."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def close(self) -> None:
        """Take no new work and fail what is still queued; running work stops at its next step."""
        with self._cond:
            self._closed = True
            queued = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for item in queued:
            self.stats.update(waiting=-1, failed=1)
            self.metrics.request_dequeued(self.name, 0.0)
            self._fail_item(item, RunnerClosedError("the server is shutting down; retry on another replica"))

    def _fail_item(self, item: Any, exc: BaseException) -> None:
        raise NotImplementedError

    def _report(self, exc: BaseException) -> None:
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:  # an alerting failure must not take the scheduler down
                logger.exception("error hook failed")


class ContinuousBatcher(_Runner):
    """Continuous batching over a :class:`StepModel` in one scheduler thread (see module docstring).

    ``max_running`` is the largest running batch; ``max_queued`` the waiting requests beyond it.
    """

    kind = "continuous"

    def __init__(self, name: str, model: StepModel, *, bos_id: int, eos_id: int, drafts: DraftIndex | None = None,
                 draft_tokens: int = 0, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.model, self.bos_id, self.eos_id = model, bos_id, eos_id
        if draft_tokens < 0:
            raise ValueError(f"draft_tokens={draft_tokens} is out of range; allowed: an integer >= 0 (0 disables)")
        # Speculative greedy decoding (chatforge.drafts): only where the model can verify a draft.
        self.drafts = drafts if draft_tokens and callable(getattr(model, "verify", None)) else None
        self.draft_tokens = draft_tokens if self.drafts is not None else 0
        self._rows: list[GenRequest] = []
        self._state: Any = None
        self._out: list[tuple[GenRequest, str, Any]] = []  # this iteration's events, sent by _flush()
        self._thread = threading.Thread(target=self._loop, name=f"chatforge-batch-{name}", daemon=True)
        self._thread.start()

    def submit(self, req: GenRequest) -> None:
        # A model whose room depends on the prompt (GPT: positions shared by prompt and reply) says per row.
        row_cap = getattr(self.model, "max_steps", None)
        cap = row_cap(req.prompt_ids) if row_cap is not None else self.model.max_len
        req.max_steps = min(req.options.max_new_tokens, cap) if cap else req.options.max_new_tokens
        self._enqueue(req)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _fail_item(self, item: GenRequest, exc: BaseException) -> None:
        item.emit("error", exc)

    # -- the scheduler loop ------------------------------------------------------------------
    def _loop(self) -> None:
        self._use_threads(1)  # a decoding step, of one row or many: measured faster with a CPU left to the loop
        # Every tensor of the batch (logits, token counts, caches) lives in inference mode.
        with torch.inference_mode():
            self._run()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._waiting or self._rows or
                                    (self._draining and self.idle))
                if self._closed or (self._draining and self.idle):
                    break
                new = self._admit()
            try:
                self._drop_cancelled()
                # New rows are prefilled (first token out at once: low time-to-first-token), join,
                # and take part in this iteration's decoding step with the rows already running.
                if new:
                    self._prefill(new)
                    self._flush()  # first tokens out before the decoding step: time to first token
                if self._rows:
                    self._decode_step()
            except Exception as e:  # noqa: BLE001 - fail the batch, keep the scheduler alive
                # Each affected request reports it (INTERNAL + alert); no separate engine alert.
                failed = self._rows + [r for r in new if r not in self._rows]
                _log_batch_failure(failed, "model %r failed while generating", self.name, exc_info=e)
                for r in failed:
                    self._finish(r, "failed", error=e)
                self._rows, self._state = [], None
            finally:
                self._flush()
        # Closed: rows still running stop here; the consumers are told why.
        for r in self._rows:
            self._finish(r, "failed", error=RunnerClosedError("server shutting down: the reply was cut off; "
                                                              "retry on another replica"))
        self._rows, self._state = [], None
        self._flush()

    def _send(self, req: GenRequest, kind: str, payload: Any) -> None:
        self._out.append((req, kind, payload))

    def _flush(self) -> None:
        """Hand this iteration's events over: one ``post_many`` per sink (event loop), so the
        consumers' loop wakes once per decoding step, not once per token per stream."""
        if not self._out:
            return
        out, self._out = self._out, []
        by_sink: dict[int, tuple[Any, list, list[GenRequest]]] = {}
        for req, kind, payload in out:
            if req.sink is None or req.deliver is None:
                req.emit(kind, payload)
                continue
            entry = by_sink.get(id(req.sink))
            if entry is None:
                entry = by_sink[id(req.sink)] = (req.sink, [], [])
            entry[1].append((req.deliver, (kind, payload)))
            entry[2].append(req)
        for sink, calls, reqs in by_sink.values():
            if not sink.post_many(calls):  # the consumers' loop is gone: stop their rows
                for req in reqs:
                    req.cancelled.set()

    def _admit(self) -> list[GenRequest]:
        """Under the lock: move waiting requests into free batch slots; drop cancelled ones."""
        return self._dequeue(lambda new, _next: len(self._rows) + len(new) < self.max_running)

    def _finish(self, req: GenRequest, outcome: str, reason: str | None = None,
                error: BaseException | None = None) -> None:
        # Log first: whoever sees the counters or the end event must also find the request's log line.
        _log(req, logging.INFO, "generation %s", outcome, model=self.name, outcome=outcome,
             completion_tokens=req.generated)
        self.running -= 1
        self.stats.update(running=-1, **{outcome: 1})
        if error is not None:
            self._send(req, "error", error)
        elif reason is not None:
            self._send(req, "end", reason)

    def _drop_cancelled(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.cancelled.is_set()]
        if len(keep) == len(self._rows):
            return
        for r in self._rows:
            if r.cancelled.is_set():
                self._finish(r, "dropped")
        self._rows = [self._rows[i] for i in keep]
        self._state = self.model.select(self._state, torch.tensor(keep, dtype=torch.long)) if keep else None

    def _emit_and_prune(self, rows: list[GenRequest], tokens: list[int] | list[list[int]],
                        failed: dict[int, BaseException] | None = None) -> list[int]:
        """Push each row's token (or tokens: a verified draft and the model's own next token); finish rows
        that hit </s> or their limit, and rows whose own token choice failed (``failed``: row index ->
        error; the other rows go on); return rows to keep."""
        keep: list[int] = []
        for i, (r, toks) in enumerate(zip(rows, tokens, strict=True)):
            if failed and i in failed:
                _log(r, logging.ERROR, "choosing the next token failed; only this request fails",
                     model=self.name, exc_info=failed[i])
                self._finish(r, "failed", error=failed[i])
                continue
            if self._emit_tokens(r, toks if isinstance(toks, list) else [toks]):
                keep.append(i)
        return keep

    def _emit_tokens(self, r: GenRequest, toks: list[int]) -> bool:
        """Emit ``toks`` in order until the row ends (</s> or its limit); True while it goes on."""
        for tok in toks:
            if tok == self.eos_id:
                self._finish(r, "completed", reason="stop")
                return False
            r.generated += 1
            r.last_token = tok
            if r.counts is not None:
                r.counts[tok] += 1
            if r.options.no_repeat_ngram_size:
                r.history.append(tok)
            if self.drafts is not None:
                r.draft_node = self.drafts.advance(r.draft_node, tok)
                r.draft_tail = (*r.draft_tail[1 - self.drafts.CONTEXT :], tok)
            self._send(r, "token", TokenDelta(token_id=tok, text=r.detok.feed(tok) if r.detok is not None else ""))
            if r.generated >= r.max_steps:
                self._finish(r, "completed", reason="length")
                return False
        return True

    def _draft(self, r: GenRequest, k: int) -> list[int]:
        """The row's draft (``DraftIndex.draft``): greedy rows whose choice reads nothing but the logits (no
        sampling, penalty, n-gram ban or eos ban); short enough that every fed token has a position
        (``max_steps``)."""
        o = r.options
        if o.do_sample or o.penalised or o.no_repeat_ngram_size or r.generated < o.min_new_tokens:
            return []
        return self.drafts.draft(r.draft_node, min(k, r.max_steps - r.generated - 1), r.draft_tail)

    def _speculative_step(self, drafts: list[list[int]]) -> None:
        """One step that feeds each row its last token and its draft, keeps the longest draft prefix the
        model agrees with (greedy) and the model's own token after it: the tokens greedy decoding would
        give one step at a time, in fewer steps."""
        rows = self._rows
        t = 1 + max(len(d) for d in drafts)
        fed = torch.tensor([[r.last_token, *d] + [self.eos_id] * (t - 1 - len(d)) for r, d in zip(rows, drafts, strict=True)],
                           dtype=torch.long)
        logits = self.model.verify(self._state, fed)  # (B, T, V)
        self.stats.update(steps=1, batches=1)
        self._observe_batch(len(rows))
        failed: dict[int, BaseException] = {}
        # Rows without a draft choose as in a plain step (their own options); the others argmax.
        plain = [i for i, d in enumerate(drafts) if not d]
        first = choose_tokens(logits[plain, 0], [rows[i] for i in plain], self.eos_id, failed) if plain else []
        if failed:
            failed = {plain[i]: e for i, e in failed.items()}
        greedy = logits.argmax(-1).tolist()  # (B, T)
        out: list[list[int]] = []
        keep_fed: list[int] = []
        chosen = dict(zip(plain, first, strict=True))
        drafted = accepted = 0
        for i, d in enumerate(drafts):
            if not d:
                out.append([chosen[i]])
                keep_fed.append(1)
                continue
            a = 0
            while a < len(d) and greedy[i][a] == d[a]:
                a += 1
            out.append([*d[:a], greedy[i][a]])
            keep_fed.append(1 + a)
            drafted += len(d)
            accepted += a
        self.model.accept(self._state, keep_fed, t)
        self.stats.update(draft_tokens=drafted, accepted_tokens=accepted)
        self.metrics.draft_tokens(self.name, drafted, accepted)
        keep = self._emit_and_prune(rows, out, failed)
        if len(keep) < len(rows):
            self._state = self.model.select(self._state, torch.tensor(keep, dtype=torch.long)) if keep else None
            self._rows = [rows[i] for i in keep]

    def _decode_step(self) -> None:
        # A step verifies at most 2 x draft_tokens draft tokens: a lone row drafts draft_tokens, a batch fewer per
        # row, a batch wider than that none (a step of many rows already has work; each draft token widens it).
        k = min(self.draft_tokens, 2 * self.draft_tokens // len(self._rows)) if self.drafts is not None else 0
        if k:
            drafts = [self._draft(r, k) for r in self._rows]
            if any(drafts):
                self._speculative_step(drafts)
                return
        tokens = torch.tensor([r.last_token for r in self._rows], dtype=torch.long)
        logits = self.model.step(self._state, tokens)
        self.stats.update(steps=1, batches=1)
        self._observe_batch(len(self._rows))
        failed: dict[int, BaseException] = {}
        chosen = choose_tokens(logits, self._rows, self.eos_id, failed)
        keep = self._emit_and_prune(self._rows, chosen, failed)
        if len(keep) < len(self._rows):
            self._state = self.model.select(self._state, torch.tensor(keep, dtype=torch.long)) if keep else None
            self._rows = [self._rows[i] for i in keep]

    def _prefill(self, new: list[GenRequest]) -> None:
        for r in new:
            if self.drafts is not None:
                r.draft_node = 0  # the reply starts at the trie's root
            self._send(r, "start", r.prompt_tokens)
            self.metrics.prompt_tokens(self.name, r.prompt_tokens)
        state, logits = self.model.prefill([r.prompt_ids for r in new], self.bos_id)
        self.stats.update(batches=1)
        self._observe_batch(len(new))
        failed: dict[int, BaseException] = {}
        chosen = choose_tokens(logits, new, self.eos_id, failed)
        keep = self._emit_and_prune(new, chosen, failed)
        if not keep:
            return
        if len(keep) < len(new):
            state = self.model.select(state, torch.tensor(keep, dtype=torch.long))
        joined = [new[i] for i in keep]
        self._state = state if self._state is None else self.model.merge(self._state, state)
        self._rows = self._rows + joined



class ThreadedRunner(_Runner):
    """One worker thread per running request over ``ReplyGenerator.stream`` (the fallback, and beam search).

    Checks the request's ``cancelled`` flag between tokens, and hands it to the decoding loops under the
    stream (``decoding.watch_decoding``), which check it before every step: a consumer that goes away
    stops the model within one step even where the stream sends nothing until it ends (beam search), so
    its worker is free again as soon as its RPC has ended. The same watch reports the reply's step cap
    (``max_new_tokens`` capped by the model's positions), so a reply cut there ends with "length".
    """

    kind = "threaded"

    def __init__(self, name: str, generator: Any, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.generator = generator
        self._executor = ThreadPoolExecutor(max_workers=self.max_running, thread_name_prefix=f"chatforge-gen-{name}")

    def submit(self, req: GenRequest) -> None:
        self._enqueue(req)
        with self._cond:
            # Admit now if a worker is free; otherwise a finishing worker admits it.
            self._pump_locked()

    def _pump_locked(self) -> None:
        if self._closed:
            return
        for req in self._dequeue(lambda new, _next: self.running + len(new) < self.max_running):
            self._executor.submit(req.context.run, self._work, req)

    def join(self, timeout: float) -> bool:
        return self.stats.wait_for(lambda s: self.running == 0, timeout)

    def close(self) -> None:
        super().close()
        # Not cancel_futures: a submitted request always runs, sees _closed and tells its consumer.
        self._executor.shutdown(wait=False)

    def _fail_item(self, item: GenRequest, exc: BaseException) -> None:
        item.emit("error", exc)

    def _work(self, req: GenRequest) -> None:
        self._use_threads(1)
        outcome, n = "failed", 0
        # The last event (end or error) is sent after the counters are updated, as the
        # continuous batcher does: a consumer that sees the end must also see `completed`.
        last: tuple[str, object] | None = None
        try:
            req.emit("start", req.prompt_tokens)
            self.metrics.prompt_tokens(self.name, req.prompt_tokens)

            def gone() -> bool:
                return req.cancelled.is_set() or self._closed

            # Decoding under the stream checks gone() before each of its steps and reports its step cap.
            with watch_decoding(should_stop=gone) as watch:
                # Only a generator that reads context is handed it (the keyword is not part of every stream()).
                stream = (self.generator.stream(req.text, req.options, context=req.turns) if req.turns
                          else self.generator.stream(req.text, req.options))
                try:
                    for delta in stream:
                        if gone():  # at most one more token after a cancel
                            break
                        n += 1
                        req.emit("token", delta)
                except DecodingStopped:
                    if not gone():  # only our own should_stop may stop it; anything else is a failure
                        raise
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
            if req.cancelled.is_set():
                outcome = "dropped"
            elif self._closed:
                last = ("error", RunnerClosedError("server shutting down: the reply was cut off; "
                                                   "retry on another replica"))
            else:
                outcome = "completed"
                # "length" at the model's cap (its positions), not only at max_new_tokens.
                last = ("end", watch.finish_reason(n, req.options.max_new_tokens))
        except BaseException as e:  # every failure must reach the consumer, which maps it to a status
            if not _is_domain_error(e):
                logger.error("model %r failed while generating", self.name, exc_info=True)
            last = ("error", e)
        finally:
            req.generated = n
            # Log first: whoever sees the counters or the end event must also find this line.
            logger.info("generation %s", outcome, extra={"model": self.name, "outcome": outcome,
                                                        "completion_tokens": n})
            with self._cond:
                self.running -= 1
                self.stats.update(running=-1, **{outcome: 1})
                self._pump_locked()
                self._cond.notify_all()
            if last is not None:
                req.emit(*last)


def _is_domain_error(e: BaseException) -> bool:
    # Domain errors (e.g. the engine's own "unavailable") are answers, not incidents.
    return any(c.__name__.endswith(("UnavailableError", "InvalidRequestError")) for c in type(e).__mro__)


@dataclass(eq=False)
class ClassifyRequest:
    texts: list[str]
    done: Callable[[list | None, BaseException | None], None]  # called from the batcher's thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(_Runner):
    """Dynamic micro-batching of classification requests (see module docstring).

    ``max_batch_size`` counts texts; ``max_running`` is 1 batch at a time per classifier
    (a forward pass already uses every core), ``max_queued`` the requests waiting for it.
    """

    kind = "micro"

    def __init__(self, name: str, classifier: Any, *, max_batch_size: int = 32, max_wait_ms: float = 0.0,
                 **kw: Any) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(
                f"max_batch_size={max_batch_size!r}, max_wait_ms={max_wait_ms!r} are out of range; "
                "allowed: max_batch_size >= 1, max_wait_ms >= 0"
            )
        kw.setdefault("max_running", 1)
        super().__init__(name, **kw)
        self.classifier, self.max_batch_size, self.max_wait = classifier, max_batch_size, max_wait_ms / 1000.0
        self._thread = threading.Thread(target=self._loop, name=f"chatforge-classify-{name}", daemon=True)
        self._thread.start()

    def submit(self, req: ClassifyRequest) -> None:
        self._enqueue(req)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _fail_item(self, item: ClassifyRequest, exc: BaseException) -> None:
        item.done(None, exc)

    def _take_batch(self) -> list[ClassifyRequest] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._waiting or self._draining)
            if self._closed or (self._draining and not self._waiting):
                return None
            deadline = self._waiting[0].enqueued + self.max_wait
            # Wait for more requests until the batch is full or the first one waited max_wait.
            while sum(len(r.texts) for r in self._waiting) < self.max_batch_size and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0 or not self._cond.wait(left):
                    break
            # A request larger than max_batch_size still runs, alone.
            return self._dequeue(lambda batch, nxt: not batch or
                                 sum(len(r.texts) for r in batch) + len(nxt.texts) <= self.max_batch_size)

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            texts = [t for r in batch for t in r.texts]
            self._use_threads(len(texts))
            self._observe_batch(len(texts))
            self.stats.update(batches=1)
            try:
                preds = self.classifier.classify(texts)
                if len(preds) != len(texts):
                    raise RuntimeError(
                        f"classifier {self.name!r} returned {len(preds)} predictions for {len(texts)} texts"
                    )
                error = None
            except Exception as e:  # noqa: BLE001 - delivered to every request of the batch
                preds, error = None, e
                if not _is_domain_error(e):
                    _log_batch_failure(batch, "classifier %r failed", self.name, exc_info=e)
            i = 0
            for r in batch:
                part = None if preds is None else preds[i : i + len(r.texts)]
                i += len(r.texts)
                r.done(part, error)
            with self._cond:
                self.running -= len(batch)
            self.stats.update(running=-len(batch), **{"completed" if error is None else "failed": len(batch)})
