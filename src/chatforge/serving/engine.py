"""The serving engine: hosts models, queues and batches requests, runs them off the event loop.

No grpc here. The API layer (``service.py``) only converts between proto and the types
below, so the engine can be driven (and tested) without a network.

Threading model: every hosted model has a *runner* (:mod:`chatforge.serving.batching`)
with its own thread(s) and a bounded queue — continuous batching for generators that
offer a step-wise model (``step_spec()``), the model's own runner where it offers one (``make_runner``:
the CTranslate2 backend), one worker thread per running request for other generators, dynamic
micro-batching for classifiers. The event loop only validates,
enqueues and moves results: a runner hands each token to the request's ``asyncio.Queue``
through the loop's :class:`LoopSink` the moment it exists; the continuous batcher hands over a
whole decoding step (one token for every running stream) at once, so the loop is woken once
per step rather than once per token per stream. A consumer that goes away
(client cancel, deadline) sets the request's ``cancelled`` flag in a ``finally``; the
runner drops it before its next decoding step and frees the slot (``dropped``).

Limits, per model: ``max_running`` sequences in the running batch (or worker threads),
``max_queued`` waiting beyond that; a request past both is refused at once with
:class:`EngineOverloadedError` (RESOURCE_EXHAUSTED), never queued unboundedly.

Hot swap: :meth:`Engine.swap` installs a new version of a model beside the old one and
switches atomically; the old runner drains (finishes what it queued and runs) and stops.
:mod:`chatforge.serving.repository` serves ``DIR/<name>/<version>/`` (versions, pins, the watcher).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import unicodedata
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge import inference, runtime
from chatforge.bundle import read_bundle_task
from chatforge.context import CONTEXT_ROLES, MAX_CONTEXT_TURNS
from chatforge.decoding import GenerationOptions
from chatforge.inference import ClassPrediction, ModelInfo, ReplyGenerator, TextClassifier, TokenDelta
from chatforge.serving import backend_ct2, backend_ort
from chatforge.serving.batching import (
    NULL_METRICS,
    ClassifyRequest,
    ContinuousBatcher,
    GenRequest,
    MicroBatcher,
    OverloadedError,
    RunnerClosedError,
    RunnerStats,
    ThreadedRunner,
)
from chatforge.serving.policy import DEFAULT_OOS_LABELS, PolicyError, ReplyPolicy, oos_labels_problem

logger = logging.getLogger(__name__)

DEFAULT_MAX_INPUT_CHARS = 4000
# Speculative greedy decoding from the bundle's training replies (chatforge.drafts): tokens drafted per step when
# not set (draft_tokens None), for fp32 and bf16 models. int8 models get none by default: activations are quantized
# with one scale per call, so a step that also verifies drafts rounds differently (docs/results/performance.md).
DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16


def default_draft_tokens(model: Any) -> int:
    """Draft tokens for ``model`` when the server sets none: :data:`DEFAULT_DRAFT_TOKENS`, 0 for an int8 model."""
    precision = (getattr(getattr(model, "info", None), "metadata", None) or {}).get("precision", "fp32")
    return 0 if precision == "int8" else DEFAULT_DRAFT_TOKENS


def check_draft_tokens(value: Any) -> None:
    """ValueError naming ``draft_tokens`` and its range unless ``value`` is None (each model's default) or an integer
    in [0, MAX_DRAFT_TOKENS]."""
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                  and 0 <= value <= MAX_DRAFT_TOKENS):
        raise ValueError(f"draft_tokens={value!r} is out of range; allowed: an integer in [0, {MAX_DRAFT_TOKENS}] "
                         f"(0 disables speculative decoding)")


class EngineError(Exception):
    """Base of the engine's domain errors; the API layer maps each subclass to a status code."""


class ModelNotFoundError(EngineError):
    """The request named a model this engine does not host."""


class InvalidRequestError(EngineError):
    """The request is malformed (empty text, too long, options out of range)."""


QUOTED_CHARS = 64  # how much of a client's value an error message quotes


def quoted(value: str, limit: int = QUOTED_CHARS) -> str:
    """``repr(value)``, shortened past ``limit`` characters to its start and its length: error messages
    travel back in the status's details (gRPC trailers, which a client refuses past 16 KiB), so a
    client's long model name or role must not be echoed whole."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_unicode(text: str, field: str = "text") -> None:
    """Refuse a lone UTF-16 surrogate (JSON's ``"\\ud800"`` without its pair): it is no character, a
    tokenizer cannot take it and UTF-8 cannot store it. gRPC never delivers one (proto strings are
    UTF-8); the HTTP surface's JSON can. Refuse NUL (U+0000) too: both surfaces deliver it, and PostgreSQL's
    text columns cannot hold it, so the conversation store would lose the turn after the call succeeded."""
    nul = text.find("\x00")
    if nul >= 0:
        raise InvalidRequestError(f"{field} holds a NUL character (U+0000 at character {nul}); allowed: text "
                                  "without NUL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{field} holds a lone surrogate ({text[e.start]!r} at character {e.start}), which is not a "
            "character; allowed: valid Unicode text (a surrogate only as half of an escaped pair)") from None


class NoModelForTaskError(EngineError):
    """No model for the requested task is loaded (e.g. Classify on a server with no classifier)."""


class EngineUnavailableError(EngineError):
    """The engine cannot take the request right now; the client may retry (elsewhere)."""


class EngineShutdownError(EngineUnavailableError):
    """The engine was closed before the request could run."""


class EngineOverloadedError(EngineError):
    """The model's running batch and queue are full (RESOURCE_EXHAUSTED: retry with backoff)."""


@dataclass
class ReplyDone:
    """The last item of :meth:`Engine.stream_reply`: why it stopped and the token counts."""

    finish_reason: str  # "stop" | "length" | "fallback" (pipeline: out of scope)
    prompt_tokens: int
    completion_tokens: int
    model: str
    version: str = ""
    intent: str = ""  # pipeline: the classifier's label
    intent_score: float = 0.0
    path: str = ""  # reply policy: "scripted" | "retrieval" | "generation" | "fallback" (serving.policy)
    path_score: float = 0.0  # reply policy: the retrieval score (also when generation answered), else the intent's
    context_turns: int = 0  # earlier turns of the conversation the model read before the message
    out_of_scope: bool = False  # a classifier judged the message out of scope (finish_reason is then "fallback")


@dataclass
class HostedModel:
    name: str  # the name requests use (the engine's key; normally equal to info.name)
    info: ModelInfo
    is_default: bool


@dataclass(frozen=True)
class PipelineConfig:
    """The chatbot pipeline: classify first; answer out-of-scope messages with ``fallback_reply``.

    A message is out of scope when the predicted label is in ``oos_labels``, the classifier
    says ``out_of_scope``, or the top score is below ``threshold``. ``oos_labels`` given must be labels of the
    classifier (checked at start and at a swap); None: ``("oos",)``, which the classifier need not have.
    """

    classifier: str
    fallback_reply: str
    threshold: float = 0.0
    oos_labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"pipeline threshold={self.threshold!r} is out of range; allowed: [0, 1]")
        if not self.fallback_reply.strip():
            raise ValueError("pipeline fallback_reply is empty; allowed: a non-empty reply text")

    def out_of_scope(self, p: ClassPrediction) -> bool:
        labels = DEFAULT_OOS_LABELS if self.oos_labels is None else self.oos_labels
        return p.label in labels or p.out_of_scope or p.score < self.threshold


@dataclass
class _Slot:
    name: str
    model: Any
    task: str  # "generation" | "classification"
    runner: Any
    spec: Any = None  # batching.StepSpec for continuously batched generators
    fallback: Any = None  # per-request runner beside a continuous batcher (beam search)

    def runners(self) -> list:
        return [r for r in (self.runner, self.fallback) if r is not None]

    @property
    def version(self) -> str:
        return str(self.model.info.version)


# Queue item kinds pushed from the runner thread to the event loop.
_START, _DELTA, _END, _ERROR = "start", "token", "end", "error"


class LoopSink:
    """Runs ``fn(arg)`` calls on one event loop for other threads, one wake-up per burst.

    ``loop.call_soon_threadsafe`` writes to the loop's self-pipe on every call, so a runner that
    called it per token woke the loop (a syscall, an epoll round and a GIL hand-over) once per
    token per stream. Here calls collect in a list; only the call that finds the list empty
    schedules the delivery, and everything posted until the loop runs it is delivered by that
    one callback, in order. ``post_many`` hands over a whole decoding step at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the engine keeps one sink per loop in a WeakKeyDictionary, which a strong
        # reference back to its key would keep alive forever (one closed loop per asyncio.run).
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[[Any], None], Any]] = []
        self._dead = False

    def post(self, fn: Callable[[Any], None], arg: Any) -> bool:
        """Queue ``fn(arg)`` for the loop (any thread); False when the loop is closed."""
        return self.post_many(((fn, arg),))

    def post_many(self, calls: Iterable[tuple[Callable[[Any], None], Any]]) -> bool:
        with self._lock:
            if self._dead:
                return False
            pending = bool(self._calls)
            self._calls.extend(calls)
            if pending or not self._calls:  # a delivery is already scheduled (or nothing to do)
                return True
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody will ever read these
            with self._lock:
                self._dead = True
                self._calls.clear()
            return False
        return True

    def _deliver(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, arg in calls:
            try:
                fn(arg)
            except Exception:  # one broken consumer must not lose the others' items
                logger.exception("delivering a result to the event loop failed")


class Engine:
    """Hosts reply generators and text classifiers and schedules their work.

    ``generators`` / ``classifiers`` map a model name to an object implementing
    :class:`chatforge.inference.ReplyGenerator` / :class:`~chatforge.inference.TextClassifier`;
    the first of each (insertion order) is the default for requests that name no model.
    ``metrics`` is an object with :class:`chatforge.serving.metrics.ServingMetrics`' hooks;
    ``on_error`` is called with exceptions that fail a whole batch (e.g. to raise an alert).
    """

    def __init__(
        self,
        generators: Mapping[str, ReplyGenerator],
        classifiers: Mapping[str, TextClassifier],
        *,
        max_input_chars: int = DEFAULT_MAX_INPUT_CHARS,
        max_input_tokens: int | None = None,
        max_new_tokens: int = GenerationOptions.MAX_NEW_TOKENS_LIMIT,
        max_running: int = 8,
        max_queued: int = 64,
        max_batch_size: int = 32,
        max_wait_ms: float = 0.0,
        continuous_batching: bool = True,
        metrics: Any = None,
        on_error: Callable[[BaseException], None] | None = None,
        pipeline: PipelineConfig | None = None,
        retrievers: Mapping[str, Any] | None = None,
        policy: ReplyPolicy | None = None,
        draft_tokens: int | None = None,
    ) -> None:
        check_draft_tokens(draft_tokens)
        checks = [
            ("max_input_chars", max_input_chars, max_input_chars >= 1, "an integer >= 1"),
            ("max_input_tokens", max_input_tokens, max_input_tokens is None or max_input_tokens >= 1,
             "None or an integer >= 1"),
            ("max_new_tokens", max_new_tokens, 1 <= max_new_tokens <= GenerationOptions.MAX_NEW_TOKENS_LIMIT,
             f"an integer in [1, {GenerationOptions.MAX_NEW_TOKENS_LIMIT}]"),
            ("max_running", max_running, max_running >= 1, "an integer >= 1"),
            ("max_queued", max_queued, max_queued >= 0, "an integer >= 0"),
            ("max_batch_size", max_batch_size, max_batch_size >= 1, "an integer >= 1"),
            ("max_wait_ms", max_wait_ms, max_wait_ms >= 0, "a number of milliseconds >= 0"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")
        overlap = ((set(generators) & set(classifiers)) | (set(generators) & set(retrievers or {}))
                   | (set(classifiers) & set(retrievers or {})))
        if overlap:
            raise ValueError(f"model names must be unique across tasks; used twice: {', '.join(sorted(overlap))}")
        self.max_input_chars, self.max_input_tokens, self.max_new_tokens = max_input_chars, max_input_tokens, max_new_tokens
        self.max_running, self.max_queued = max_running, max_queued
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.continuous_batching = continuous_batching
        self.draft_tokens = draft_tokens
        self.metrics = metrics or NULL_METRICS
        self.on_error = on_error
        self.stats = RunnerStats()
        self._lock = threading.Lock()
        self._sinks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopSink] = weakref.WeakKeyDictionary()
        self._closed = False
        self._generators: dict[str, _Slot] = {}
        self._classifiers: dict[str, _Slot] = {}
        try:
            for name, g in generators.items():
                self._generators[name] = self._make_slot(name, g, "generation")
            for name, c in classifiers.items():
                self._classifiers[name] = self._make_slot(name, c, "classification")
            self._check_routing(pipeline, retrievers, policy)
        except BaseException:
            # The runners already started (a scheduler thread each) would wait for work forever.
            self.close()
            raise
        for slot in self._slots():
            self.metrics.set_model_info(slot.model.info)

    def _check_routing(self, pipeline: PipelineConfig | None, retrievers: Mapping[str, Any] | None,
                       policy: ReplyPolicy | None) -> None:
        """Check the pipeline or reply policy against the hosted models; sets ``pipeline``, ``retrievers``, ``policy``."""
        if pipeline is not None and pipeline.classifier not in self._classifiers:
            raise ValueError(
                f"pipeline classifier {pipeline.classifier!r} is not hosted; "
                f"classifiers: {', '.join(self._classifiers) or 'none'}"
            )
        if pipeline is not None and not self._generators:
            # Reply would go to a selection model (the default without a generator) and skip the classifier
            raise ValueError(
                f"the pipeline (classify with {pipeline.classifier!r} -> fallback -> generate) needs a generator, and "
                "this server hosts no generation model, so no Reply would pass the classifier; to put a classifier "
                "in front of a selection model write a reply policy (--policy) with classifier, retriever and "
                "generate: false"
            )
        if pipeline is not None and (problem := oos_labels_problem(
                "pipeline", pipeline.oos_labels, pipeline.classifier, self._classifiers[pipeline.classifier].model)):
            raise ValueError(problem)
        self.pipeline = pipeline
        # Selection models answer in one matrix product: called off the loop, no batching runner.
        self.retrievers: dict[str, Any] = dict(retrievers or {})
        if policy is not None:
            if pipeline is not None:
                raise ValueError("give a reply policy or a pipeline, not both (a policy includes the pipeline)")
            policy.check_hosted(self.classifiers, self.retrievers, bool(self._generators), self._generators)
        self.policy = policy

    # ------------------------------------------------------------------ construction

    def _make_slot(self, name: str, model: Any, task: str) -> _Slot:
        kw = {"max_queued": self.max_queued, "stats": self.stats, "metrics": self.metrics,
              "on_error": self.on_error}
        # torch's threads per call (backends size their own pools); generator slots are made first, so a classifier
        # knows whether it shares the process with decoding
        threads = runtime.runner_threads(task, alongside_decoding=bool(self._generators))
        if task == "classification":
            runner = MicroBatcher(name, model, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
                                  threads=threads, **kw)
            logger.info("hosting classification model %r (torch threads: %s)", name,
                        "as OMP_NUM_THREADS sets" if threads is None else f"{threads[0]} for one text, "
                        f"{threads[1]} for a batch", extra={"model": name, "runner": runner.kind})
            return _Slot(name, model, task, runner)
        make_runner = getattr(model, "make_runner", None)
        if callable(make_runner):  # a backend that schedules its own batches (serving.backend_ct2)
            runner = make_runner(name, max_running=self.max_running, **kw)
            logger.info("hosting %s model %r (%s runner)", task, name, runner.kind,
                        extra={"model": name, "runner": runner.kind})
            return _Slot(name, model, task, runner)
        spec = None
        if self.continuous_batching and callable(getattr(model, "step_spec", None)):
            spec = model.step_spec()
        kw["threads"] = threads
        if spec is not None:
            drafts_asked = default_draft_tokens(model) if self.draft_tokens is None else self.draft_tokens
            runner = ContinuousBatcher(name, spec.model, bos_id=spec.bos_id, eos_id=spec.eos_id,
                                       drafts=spec.drafts, draft_tokens=drafts_asked,
                                       max_running=self.max_running, **kw)
            # Beam search keeps several hypotheses per request: it runs per request, beside the batch.
            fallback = ThreadedRunner(name, model, max_running=self.max_running, **kw)
            drafting = (f"speculative decoding: {runner.draft_tokens} draft tokens from {len(runner.drafts)} stored "
                        f"replies" if runner.drafts is not None else
                        "speculative decoding off" + (
                            ": an int8 model (--draft-tokens N turns it on)" if not drafts_asked and self.draft_tokens is None
                            else "" if not drafts_asked
                            else ": the bundle stores no replies (drafts/; chatforge bundle add-drafts adds them)"
                            if spec.drafts is None
                            else ": the model cannot verify drafts"))
            logger.info("hosting %s model %r (%s runner; %s)", task, name, runner.kind, drafting,
                        extra={"model": name, "runner": runner.kind, "draft_tokens": runner.draft_tokens})
            return _Slot(name, model, task, runner, spec, fallback)
        else:
            # No step-wise model (other families, fakes): one thread per running request.
            runner = ThreadedRunner(name, model, max_running=self.max_running, **kw)
        logger.info("hosting %s model %r (%s runner)", task, name, runner.kind,
                    extra={"model": name, "runner": runner.kind})
        return _Slot(name, model, task, runner, spec)

    @classmethod
    def from_bundles(cls, bundles: Mapping[str, str | Path], *, versions: Mapping[str, str] | None = None,
                     precision: str = "fp32", backend: str = "torch", backends: Mapping[str, str] | None = None,
                     **kwargs) -> Engine:
        """Load every bundle (name -> folder) with :func:`chatforge.inference.load_model`, torch models
        at ``precision`` (``inference.PRECISIONS``: fp32, bf16, int8 or auto); ``backend`` (``backends``: per
        model name) ``ctranslate2`` serves GPT and Transformer generators through CTranslate2 (serving.backend_ct2)."""
        if not bundles:
            raise ValueError("no bundles given; pass at least one name -> bundle folder")
        generators: dict[str, ReplyGenerator] = {}
        classifiers: dict[str, TextClassifier] = {}
        retrievers: dict[str, Any] = {}
        for name, path in bundles.items():
            model = load_hosted_model(path, name, (versions or {}).get(name, "1"), precision,
                                      (backends or {}).get(name, backend))
            {"generation": generators, "selection": retrievers, "classification": classifiers}[model_task(model)][name] = model
        if retrievers:
            kwargs["retrievers"] = {**retrievers, **kwargs.get("retrievers", {})}
        return cls(generators, classifiers, **kwargs)

    def attach(self, *, metrics: Any = None, on_error: Callable[[BaseException], None] | None = None) -> None:
        """Connect the server's metrics and error hook to an engine built elsewhere."""
        if metrics is not None:
            self.metrics = metrics
        if on_error is not None:
            self.on_error = on_error
        for slot in self._slots():
            for runner in slot.runners():
                runner.metrics = self.metrics
                runner.on_error = self.on_error
            self.metrics.set_model_info(slot.model.info)

    def close(self) -> None:
        """Stop accepting work; running sequences stop at their next step."""
        self._closed = True
        for slot in self._slots():
            for runner in slot.runners():
                runner.close()

    def join(self, timeout: float) -> bool:
        """After :meth:`close`: wait until every runner's threads have stopped; False on timeout."""
        deadline = time.monotonic() + timeout
        ok = True
        for slot in self._slots():
            for runner in slot.runners():
                ok = runner.join(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def _sink(self, loop: asyncio.AbstractEventLoop) -> LoopSink:
        sink = self._sinks.get(loop)
        if sink is None:
            with self._lock:
                sink = self._sinks.setdefault(loop, LoopSink(loop))
        return sink

    def _check_open(self) -> None:
        if self._closed:
            raise EngineShutdownError("the server is shutting down; retry on another replica")

    # ------------------------------------------------------------------ introspection

    def _slots(self) -> list[_Slot]:
        return list(self._generators.values()) + list(self._classifiers.values())

    @property
    def generators(self) -> dict[str, ReplyGenerator]:
        return {n: s.model for n, s in self._generators.items()}

    @property
    def classifiers(self) -> dict[str, TextClassifier]:
        return {n: s.model for n, s in self._classifiers.items()}

    @property
    def default_generator(self) -> str | None:
        return next(iter(self._generators), None)

    @property
    def default_classifier(self) -> str | None:
        return next(iter(self._classifiers), None)

    @property
    def default_selector(self) -> str | None:
        """The selection model a Reply without ``model`` answers with: the first hosted one, only when the server
        hosts no generator and no reply policy (which would decide instead)."""
        if self._generators or self.policy is not None:
            return None
        return next(iter(self.retrievers), None)

    def models(self) -> list[HostedModel]:
        """Every hosted model, in load order: generators, classifiers, then selection models (Reply answers with
        one when the request names it, see :meth:`stream_reply`)."""
        out = [HostedModel(n, s.model.info, n == self.default_generator) for n, s in self._generators.items()]
        out += [HostedModel(n, s.model.info, n == self.default_classifier) for n, s in self._classifiers.items()]
        out += [HostedModel(n, m.info, n == self.default_selector) for n, m in self.retrievers.items()]
        return out

    def _reply_selector(self, model: str | None) -> str | None:
        """The selection model that answers a Reply naming ``model`` (or the default one), None for generation;
        a name that is neither a generator nor a selection model is an error before any path runs, also when a
        reply policy would have answered without it."""
        if not model:
            return self.default_selector
        if model in self._generators:
            return None
        if model in self.retrievers:
            return model
        names = sorted([*self._generators, *self.retrievers])
        if not names:
            raise NoModelForTaskError("Reply is not available: this server hosts no generation or selection model")
        raise ModelNotFoundError(f"no generation or selection model named {quoted(model)}; available: {', '.join(names)}")

    def runner_kind(self, name: str) -> str:
        slot = self._generators.get(name) or self._classifiers.get(name)
        if slot is None:
            raise ModelNotFoundError(f"no model named {quoted(name)}")
        return slot.runner.kind

    @property
    def active(self) -> int:
        """Requests running right now (in a batch or a worker), all models."""
        return self.stats.running

    @property
    def waiting(self) -> int:
        return self.stats.waiting

    @property
    def completed(self) -> int:
        return self.stats.completed

    @property
    def dropped(self) -> int:
        """Requests removed because their consumer went away (cancel, deadline)."""
        return self.stats.dropped

    cancelled = dropped  # the walking skeleton's name

    @property
    def failed(self) -> int:
        return self.stats.failed

    @property
    def rejected(self) -> int:
        """Requests refused because the model was overloaded."""
        return self.stats.rejected

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing runs or waits (True) or ``timeout`` seconds pass (False)."""
        return self.stats.wait_for(lambda s: s.running == 0 and s.waiting == 0, timeout)

    # ------------------------------------------------------------------ validation

    def check_text(self, text: str, field: str = "text") -> None:
        if not isinstance(text, str):
            raise InvalidRequestError(f"{field} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InvalidRequestError(f"{field} is empty; allowed: 1 to {self.max_input_chars} characters")
        # Counted composed (NFC): decomposed Hangul (NFD, as some systems send it) spells each syllable in 2-3
        # letters, and every model reads it composed.
        if len(text) > self.max_input_chars and len(unicodedata.normalize("NFC", text)) > self.max_input_chars:
            raise InvalidRequestError(
                f"{field} is {len(unicodedata.normalize('NFC', text))} characters long; allowed: at most "
                f"{self.max_input_chars}"
            )
        check_unicode(text, field)

    def check_context(self, turns: Sequence[tuple[str, str]], field: str = "context") -> None:
        """Earlier turns of a conversation, as (role, text): at most MAX_CONTEXT_TURNS, roles from
        CONTEXT_ROLES, each text as :meth:`check_text` allows."""
        if len(turns) > MAX_CONTEXT_TURNS:
            raise InvalidRequestError(f"{field} holds {len(turns)} turns; allowed: at most {MAX_CONTEXT_TURNS} "
                                      "(send the latest ones)")
        for i, (role, text) in enumerate(turns):
            if role not in CONTEXT_ROLES:
                raise InvalidRequestError(f"{field}[{i}].role is {quoted(role)}; allowed: {', '.join(CONTEXT_ROLES)}")
            self.check_text(text, field=f"{field}[{i}].text")

    def _check_tokens(self, n: int, name: str, model_limit: int, field: str = "text") -> None:
        limit = min(model_limit, self.max_input_tokens or model_limit)
        if n > limit:
            raise InvalidRequestError(
                f"{field} is {n} tokens long; model {name!r} accepts at most {limit} input tokens"
            )

    def check_options(self, options: GenerationOptions | None) -> GenerationOptions:
        # No options: the defaults, within this server's cap on new tokens.
        options = options or GenerationOptions(max_new_tokens=min(GenerationOptions.max_new_tokens,
                                                                  self.max_new_tokens))
        try:
            options.validate()
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        if options.max_new_tokens > self.max_new_tokens:
            raise InvalidRequestError(
                f"max_new_tokens={options.max_new_tokens} is out of range; this server allows at most "
                f"{self.max_new_tokens}"
            )
        return options

    def _resolve(self, slots: Mapping[str, _Slot], model: str | None, task: str, rpc: str) -> _Slot:
        if not slots:
            raise NoModelForTaskError(f"{rpc} is not available: this server hosts no {task} model")
        name = model or next(iter(slots))
        if name not in slots:
            raise ModelNotFoundError(f"no {task} model named {quoted(name)}; available: {', '.join(sorted(slots))}")
        return slots[name]

    def _submit(self, slots: Mapping[str, _Slot], name: str, req: Any, per_request: bool = False
                ) -> tuple[_Slot, Any]:
        """Submit ``req`` to ``name``'s runner; the slot and the runner that took it."""
        # A hot swap may drain the slot we resolved between resolving and submitting: the
        # request then goes to the version that replaced it, so a swap never fails a request.
        for _ in range(3):
            slot = slots[name]
            runner = slot.fallback if per_request and slot.fallback is not None else slot.runner
            try:
                runner.submit(req)
                return slot, runner
            except OverloadedError as e:
                raise EngineOverloadedError(str(e)) from None
            except RunnerClosedError:
                if self._closed or slots.get(name) is slot:
                    raise EngineShutdownError("the server is shutting down; retry on another replica") from None
        raise EngineShutdownError(f"model {name!r} is being replaced; retry")

    # ------------------------------------------------------------------ generation

    async def stream_reply(
        self, text: str, options: GenerationOptions | None = None, model: str | None = None,
        context: Sequence[str] = (), on_start: Callable[[ReplyDone], None] | None = None,
    ) -> AsyncIterator[TokenDelta | ReplyDone]:
        """Yield a :class:`TokenDelta` per generated token, then exactly one :class:`ReplyDone`.

        ``context`` holds the conversation's earlier turns, oldest first (checked by the surfaces, which
        name their own fields). A generator that reads context (``context_turns`` > 0, from its bundle's
        ``data.context_turns``) gets as many of the latest as fit its input; ``ReplyDone.context_turns``
        says how many it read. Other generators, and the scripted/retrieval paths, read the message only.
        ``model`` may also name a hosted selection model: its best pool answer comes back as one delta, with
        ``path`` "retrieval" and its score, whatever the reply policy would have done.

        ``on_start`` is called once, before a model starts generating, with what the final :class:`ReplyDone`
        will say except ``finish_reason`` (empty) and ``completion_tokens`` (0): a consumer that stops reading
        early (a stop sequence) keeps the reply's model, intent, path and context turns. Whole replies (scripted,
        retrieval, fallback) do not call it: their ReplyDone follows their one delta at once.

        Raises :class:`InvalidRequestError`, :class:`ModelNotFoundError`,
        :class:`NoModelForTaskError` or :class:`EngineOverloadedError` before the first token.
        Close the iterator (``aclose()`` or ``contextlib.aclosing``) to stop the model early.
        """
        self.check_text(text)
        options = self.check_options(options)
        self._check_open()
        path, path_score, policy_intent = "", 0.0, ("", 0.0)
        # model name -> the version that answered for this reply: a hot swap may replace a model while it answers,
        # and the reply must name the version that chose it, not the one serving afterwards
        used: dict[str, str] = {}

        async def classify(name: str, text: str) -> ClassPrediction:
            preds, hosted = await self.classify_with_model([text], name)
            used[name] = str(hosted.info.version)
            return preds[0]

        async def retrieve(name: str, text: str) -> tuple[str, float]:
            selector = self.retrievers[name]
            used[name] = str(selector.info.version)
            return await asyncio.to_thread(selector.select, text)

        def familiarity(name: str, text: str) -> float:  # microseconds: dict lookups per character, on the loop
            selector = self.retrievers[name]
            used[name] = str(selector.info.version)
            return selector.familiarity(text)

        selector = self._reply_selector(model)
        if selector is not None:  # a selection model answers directly: its best pool answer, as one delta
            reply, score = await retrieve(selector, text)
            yield TokenDelta(token_id=-1, text=reply)
            yield ReplyDone("stop", 0, 0, selector, used[selector], "", 0.0, "retrieval", float(score))
            return
        if self.policy is not None:
            route = await self.policy.route(text, classify, retrieve, familiarity)
            if route.reply is not None:  # scripted, retrieval or fallback: the whole reply as one delta
                version = used.get(route.model, "")
                yield TokenDelta(token_id=-1, text=route.reply)
                yield ReplyDone("fallback" if route.path == "fallback" else "stop", 0, 0, route.model, version,
                                route.intent, route.intent_score, route.path, route.score,
                                out_of_scope=route.out_of_scope)
                return
            path, path_score, policy_intent = route.path, route.score, (route.intent, route.intent_score)
            model = model or self.policy.generator  # a Reply naming a generator keeps it
        slot = self._resolve(self._generators, model, "generation", "Reply")
        intent, intent_score = policy_intent
        if self.pipeline is not None:
            pred = await classify(self.pipeline.classifier, text)
            intent, intent_score = pred.label, pred.score
            if self.pipeline.out_of_scope(pred):
                yield TokenDelta(token_id=-1, text=self.pipeline.fallback_reply)
                yield ReplyDone("fallback", 0, 0, self.pipeline.classifier, used[self.pipeline.classifier], intent,
                                intent_score, out_of_scope=True)
                return

        check = getattr(slot.model, "check_options", None)
        if check is not None:  # a backend that cannot honour an option (serving.backend_ct2) says which
            try:
                check(options)
            except ValueError as e:
                raise InvalidRequestError(str(e)) from None
        beams = getattr(options, "num_beams", 1) > 1
        encode_prompt = getattr(slot.model, "encode_prompt", None) if context else None
        turns: tuple[str, ...] = ()
        if slot.spec is not None and not beams:
            ids = slot.spec.encode(text)
            n_prompt = len(ids)
            prompt = ids or [slot.spec.unk_id]
            detok = slot.spec.new_detokenizer()
        else:
            n_prompt = slot.model.count_tokens(text)
            prompt, detok = [], None
        try:
            self._check_tokens(n_prompt, slot.name, slot.model.max_input_tokens)
        except InvalidRequestError:
            if path != "generation" or self.policy is None:
                raise
            # The policy sent a message the generator cannot take (too many tokens) that the server accepts and
            # that retrieval would have answered had it scored higher: the policy's fallback reply, as when no
            # path can answer, rather than an error that depends on the retrieval score.
            owner = self.policy.retriever or self.policy.classifier or slot.name
            version = used.get(owner, slot.version)
            yield TokenDelta(token_id=-1, text=self.policy.fallback_reply)
            yield ReplyDone("fallback", 0, 0, owner, version, intent, intent_score, "fallback", path_score)
            return
        n_context = 0
        if encode_prompt is not None:
            # The message fits (checked above); earlier turns fill what is left of the model's input.
            with_context, n_context = encode_prompt(text, context)
            if n_context:
                turns = tuple(context)
                n_prompt = len(with_context)
                if prompt:
                    prompt = with_context

        sink = self._sink(asyncio.get_running_loop())
        # Unbounded: the model is the slow side, so the queue holds at most the tokens of one
        # event-loop hiccup, and a bound would make the runner block where it cannot see `cancelled`.
        queue: asyncio.Queue = asyncio.Queue()
        deliver = queue.put_nowait  # runs on the loop (LoopSink)

        def emit(kind: str, payload: Any) -> None:  # any thread
            if not sink.post(deliver, (kind, payload)):
                req.cancelled.set()  # the loop is closed: nobody is listening any more

        req = GenRequest(text=text, prompt_ids=prompt, options=options, emit=emit, detok=detok,
                         prompt_tokens=n_prompt, sink=sink, deliver=deliver, turns=turns)
        slot, runner = self._submit(self._generators, slot.name, req, per_request=beams)
        if on_start is not None:
            on_start(ReplyDone("", n_prompt, 0, slot.name, slot.version, intent, intent_score, path, path_score,
                               n_context))
        prompt_tokens, n, ended = n_prompt, 0, False
        try:
            while True:
                kind, payload = await queue.get()
                if kind == _DELTA:
                    n += 1
                    yield payload
                elif kind == _START:
                    prompt_tokens = payload
                elif kind == _END:
                    ended = True
                    yield ReplyDone(payload, prompt_tokens, n, slot.name, slot.version, intent, intent_score,
                                    path, path_score, n_context)
                    return
                else:
                    ended = True
                    if isinstance(payload, RunnerClosedError):
                        raise EngineShutdownError(str(payload))
                    raise payload
        finally:
            # Runs on normal end, on error, and when the consumer closes us (cancel/deadline):
            # the runner drops the sequence before its next step.
            req.cancelled.set()
            if not ended:
                self.stats.update(abandoned=1)
                runner.withdraw(req)  # still queued: its place is free now, not when a running reply ends

    # ------------------------------------------------------------------ classification

    async def classify(self, texts: list[str], model: str | None = None) -> list[ClassPrediction]:
        """Classify each text with the named (or default) classifier, micro-batched with others."""
        preds, _ = await self.classify_with_model(texts, model)
        return preds

    async def classify_with_model(self, texts: list[str], model: str | None = None
                                  ) -> tuple[list[ClassPrediction], HostedModel]:
        """:meth:`classify`, also returning which model (and version) answered."""
        if isinstance(texts, str):
            raise InvalidRequestError("texts must be a list of strings, not a single string")
        if not texts:
            raise InvalidRequestError("texts is empty; allowed: at least one text")
        for i, t in enumerate(texts):
            self.check_text(t, field="text" if len(texts) == 1 else f"texts[{i}]")
        slot = self._resolve(self._classifiers, model, "classification", "Classify")
        limit = slot.model.max_input_tokens
        for i, t in enumerate(texts):
            self._check_tokens(slot.model.count_tokens(t), slot.name, limit,
                               "text" if len(texts) == 1 else f"texts[{i}]")
        self._check_open()
        loop = asyncio.get_running_loop()
        sink = self._sink(loop)
        future: asyncio.Future = loop.create_future()

        def settle(outcome) -> None:
            result, error = outcome
            if future.done():
                return
            if error is not None:
                future.set_exception(EngineShutdownError(str(error)) if isinstance(error, RunnerClosedError) else error)
            else:
                future.set_result(result)

        def done(result, error) -> None:
            # Through the sink: a micro-batch settles all its callers with one wake-up of the loop.
            sink.post(settle, (result, error))

        req = ClassifyRequest(list(texts), done)
        slot, runner = self._submit(self._classifiers, slot.name, req)
        try:
            preds = await future
        finally:
            req.cancelled.set()
            if not future.done():
                runner.withdraw(req)  # the caller went away while it was queued
        return preds, HostedModel(slot.name, slot.model.info, slot.name == self.default_classifier)

    # ------------------------------------------------------------------ hot swap

    def version_of(self, name: str) -> str | None:
        slot = self._generators.get(name) or self._classifiers.get(name)
        if slot is not None:
            return slot.version
        selector = self.retrievers.get(name)
        return None if selector is None else str(selector.info.version)

    def task_of(self, name: str) -> str | None:
        """What ``name`` serves: "generation", "classification" or "selection"; None when it is not hosted."""
        for task, hosted in (("generation", self._generators), ("classification", self._classifiers),
                             ("selection", self.retrievers)):
            if name in hosted:
                return task
        return None

    def _check_policy_after_swap(self, name: str, model: Any, task: str) -> None:
        """The reply policy's start-up check (:meth:`ReplyPolicy.check_hosted`) over the models as they would be
        after the swap: a version that breaks it (a classifier without an intent the policy scripts) is refused
        before anything of it is built, and the served version keeps answering."""
        hosted = {"generation": {n: s.model for n, s in self._generators.items()},
                  "classification": self.classifiers, "selection": dict(self.retrievers)}
        hosted[task][name] = model
        try:
            self.policy.check_hosted(hosted["classification"], hosted["selection"], bool(hosted["generation"]),
                                     hosted["generation"])
        except PolicyError as e:
            raise PolicyError(f"version {model.info.version} of {name!r} breaks the reply policy: {e} "
                              "(not swapped in; the served version keeps answering)") from None

    def swap(self, name: str, model: Any) -> str | None:
        """Serve ``model`` under ``name`` from now on; the previous version drains and stops.

        The new runner is built before the switch (a dict assignment, atomic), so every
        request lands on one version or the other, and none is refused. Returns the old
        version (None when ``name`` is new).
        """
        task = model_task(model)
        served = self.task_of(name)
        if served is not None and served != task:
            raise ValueError(f"model {name!r} serves {served}; this version is a {task} model, and a name keeps "
                             "its task across versions (names are unique across tasks)")
        if self.policy is not None:
            self._check_policy_after_swap(name, model, task)
        if self.pipeline is not None and name == self.pipeline.classifier and (problem := oos_labels_problem(
                "pipeline", self.pipeline.oos_labels, name, model)):
            raise ValueError(f"version {model.info.version} of {name!r} breaks the pipeline: {problem} (not swapped "
                             "in; the served version keeps answering)")
        if task == "selection":
            # A selection model answers in one call off the loop (no runner): the next call reads the new one,
            # calls already running finish on the old one, which they hold.
            with self._lock:
                old_selector = self.retrievers.get(name)
                self.retrievers[name] = model
            self.metrics.set_model_info(model.info)
            previous = None if old_selector is None else str(old_selector.info.version)
            if old_selector is not None and previous != str(model.info.version):
                self.metrics.remove_model_info(old_selector.info)
            logger.info("model %r now serves version %s", name, model.info.version,
                        extra={"model": name, "version": str(model.info.version), "previous": previous})
            return previous
        slots = self._generators if task == "generation" else self._classifiers
        new = self._make_slot(name, model, task)
        with self._lock:
            old = slots.get(name)
            slots[name] = new
        self.metrics.set_model_info(model.info)
        if old is not None:
            for runner in old.runners():
                runner.drain()
            if old.version != new.version:
                self.metrics.remove_model_info(old.model.info)
        logger.info("model %r now serves version %s", name, new.version,
                    extra={"model": name, "version": new.version, "previous": old.version if old else None})
        return old.version if old else None


# --------------------------------------------------------------------------- bundles and versions


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def model_task(model: Any) -> str:
    """The task a loaded model serves in the engine: "generation" (``stream``), "selection" (``select``) or
    "classification" (``classify``)."""
    return "generation" if hasattr(model, "stream") else "selection" if hasattr(model, "select") else "classification"


# A bundle's metadata task -> the engine task its model serves (lm: a GPT continuing the text)
BUNDLE_TASKS = {"generation": "generation", "lm": "generation", "classification": "classification",
                "selection": "selection"}


def bundle_serving_task(path: str | Path) -> str | None:
    """The engine task a bundle folder will serve, read from its ``metadata.json`` alone (no weights loaded);
    None when the file is missing, unreadable or names no task this engine serves (loading then says why)."""
    return BUNDLE_TASKS.get(read_bundle_task(path) or "")


def load_hosted_model(path: str | Path, name: str, version: str = "1", precision: str = "fp32",
                      backend: str = "torch") -> ReplyGenerator | TextClassifier:
    """Load a bundle for serving, with its lineage (config/data/tokenizer hashes) in the metadata.

    ``backend="ctranslate2"`` serves a GPT or Transformer generator through CTranslate2 at ``precision``
    (:mod:`chatforge.serving.backend_ct2`); ``backend="onnxruntime"`` serves a BERT/Transformer classifier
    through ONNX Runtime (:mod:`chatforge.serving.backend_ort`); other bundles are loaded by torch as always."""
    if backend_ct2.check_backend(backend) == "ctranslate2" and backend_ct2.applies(path, name):
        model: Any = backend_ct2.CT2Generator(Path(path), name, version, precision)
    elif backend == "onnxruntime" and backend_ort.applies(path, name):
        model = backend_ort.OrtClassifier(Path(path), name, version, precision)
    else:
        model = inference.load_model(Path(path), name, version, precision)
    if not (hasattr(model, "stream") or hasattr(model, "classify") or hasattr(model, "select")):
        raise TypeError(
            f"bundle {name!r} ({path}) loaded a {type(model).__name__}, which is neither a "
            "ReplyGenerator (stream), a TextClassifier (classify) nor a ReplySelector (select)"
        )
    info = getattr(model, "info", None)
    if info is not None and isinstance(info.metadata, dict):
        meta = info.metadata
        config_hash = _sha256_file(Path(path) / "config.yaml")
        if config_hash:
            meta.setdefault("config_sha256", config_hash)
        tok = meta.get("tokenizer")
        if isinstance(tok, dict) and tok.get("sha256"):
            meta.setdefault("tokenizer_sha256", tok["sha256"])
        meta.setdefault("bundle", str(path))
        # classifiers: the oos policy Classify applies; ensembles: how their members are pooled
        for part in (getattr(model, "oos", None), getattr(model, "model", None)):
            if hasattr(part, "serving_metadata"):
                for k, v in part.serving_metadata().items():
                    meta.setdefault(k, v)
    logger.info("loaded model", extra={"model": name, "bundle": str(path), "version": version})
    return model
