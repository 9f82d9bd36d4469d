"""The serving engine: hosts models and runs them off the event loop. No grpc here.

The API layer (``service.py``) only converts between proto and the types below, so
the engine can be driven (and tested) without a network, and a later batching
engine can replace this one behind the same methods.

Threading model: model work (tokenisation, torch forward passes) runs in a
``ThreadPoolExecutor`` whose size is ``max_concurrency``; the event loop only moves
tokens from that thread to the RPC. A reply's worker pushes each token to an
``asyncio.Queue`` with ``loop.call_soon_threadsafe`` the moment the model yields it,
and checks a ``threading.Event`` between tokens, so a consumer that goes away
(client cancel, deadline) stops the model within one token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from chatforge.decoding import GenerationOptions
from chatforge.inference import ClassPrediction, ModelInfo, ReplyGenerator, TextClassifier, TokenDelta

logger = logging.getLogger(__name__)

DEFAULT_MAX_INPUT_CHARS = 4000


class EngineError(Exception):
    """Base of the engine's domain errors; the API layer maps each subclass to a status code."""


class ModelNotFoundError(EngineError):
    """The request named a model this engine does not host."""


class InvalidRequestError(EngineError):
    """The request is malformed (empty text, too long, options out of range)."""


class NoModelForTaskError(EngineError):
    """No model for the requested task is loaded (e.g. Classify on a server with no classifier)."""


class EngineUnavailableError(EngineError):
    """The engine cannot take the request right now; the client may retry (elsewhere)."""


class EngineShutdownError(EngineUnavailableError):
    """The engine was closed before the request could run."""


@dataclass
class ReplyDone:
    """The last item of :meth:`Engine.stream_reply`: why it stopped and the token counts."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    model: str


@dataclass
class HostedModel:
    name: str  # the name requests use (the engine's key; normally equal to info.name)
    info: ModelInfo
    is_default: bool


# Queue item kinds pushed from the worker thread to the event loop.
_START, _DELTA, _END, _ERROR = "start", "delta", "end", "error"


class Engine:
    """Hosts reply generators and text classifiers and runs them in worker threads.

    ``generators`` / ``classifiers`` map a model name to an object implementing
    :class:`chatforge.inference.ReplyGenerator` / :class:`~chatforge.inference.TextClassifier`;
    the first of each (insertion order) is the default for requests that name no model.
    """

    def __init__(
        self,
        generators: Mapping[str, ReplyGenerator],
        classifiers: Mapping[str, TextClassifier],
        *,
        max_input_chars: int = DEFAULT_MAX_INPUT_CHARS,
        max_concurrency: int = 1,
    ) -> None:
        if max_input_chars < 1:
            raise ValueError(f"max_input_chars={max_input_chars!r} is out of range; allowed: an integer >= 1")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency!r} is out of range; allowed: an integer >= 1")
        overlap = set(generators) & set(classifiers)
        if overlap:
            raise ValueError(f"model names must be unique across tasks; used twice: {', '.join(sorted(overlap))}")
        self.generators: dict[str, ReplyGenerator] = dict(generators)
        self.classifiers: dict[str, TextClassifier] = dict(classifiers)
        self.max_input_chars = max_input_chars
        self.max_concurrency = max_concurrency
        # The executor's size is the concurrency limit: further requests wait in its queue.
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="chatforge-model")
        self._cond = threading.Condition()
        self._closed = False
        self._active = 0
        self._completed = 0
        self._cancelled = 0
        self._failed = 0

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_bundles(cls, bundles: Mapping[str, str | Path], **kwargs) -> Engine:
        """Load every bundle (name -> folder) with :func:`chatforge.inference.load_model`."""
        # Imported here so that the engine (and its tests) do not pull in torch and the models.
        from chatforge.inference import load_model

        if not bundles:
            raise ValueError("no bundles given; pass at least one name -> bundle folder")
        generators: dict[str, ReplyGenerator] = {}
        classifiers: dict[str, TextClassifier] = {}
        for name, path in bundles.items():
            model = load_model(Path(path), name)
            if hasattr(model, "stream"):
                generators[name] = model
            elif hasattr(model, "classify"):
                classifiers[name] = model
            else:
                raise TypeError(
                    f"bundle {name!r} ({path}) loaded a {type(model).__name__}, which is neither a "
                    "ReplyGenerator (stream) nor a TextClassifier (classify)"
                )
            logger.info("loaded model", extra={"model": name, "bundle": str(path)})
        return cls(generators, classifiers, **kwargs)

    def close(self) -> None:
        """Stop accepting work; running workers finish their current token and exit."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineShutdownError("the server is shutting down; retry on another replica")

    # ------------------------------------------------------------------ introspection

    @property
    def default_generator(self) -> str | None:
        return next(iter(self.generators), None)

    @property
    def default_classifier(self) -> str | None:
        return next(iter(self.classifiers), None)

    def models(self) -> list[HostedModel]:
        """Every hosted model, generators first, in load order."""
        out = [HostedModel(name, g.info, name == self.default_generator) for name, g in self.generators.items()]
        out += [HostedModel(name, c.info, name == self.default_classifier) for name, c in self.classifiers.items()]
        return out

    @property
    def active(self) -> int:
        """Reply workers running right now."""
        return self._active

    @property
    def completed(self) -> int:
        """Replies that ran to their end ("stop" or "length")."""
        return self._completed

    @property
    def cancelled(self) -> int:
        """Replies whose worker stopped because the consumer went away."""
        return self._cancelled

    @property
    def failed(self) -> int:
        """Replies whose model raised."""
        return self._failed

    def wait_idle(self, timeout: float) -> bool:
        """Block until no reply worker runs (True) or ``timeout`` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout=timeout)

    # ------------------------------------------------------------------ validation

    def check_text(self, text: str, field: str = "text") -> None:
        if not isinstance(text, str):
            raise InvalidRequestError(f"{field} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InvalidRequestError(f"{field} is empty; allowed: 1 to {self.max_input_chars} characters")
        if len(text) > self.max_input_chars:
            raise InvalidRequestError(
                f"{field} is {len(text)} characters long; allowed: at most {self.max_input_chars}"
            )

    def _resolve(self, models: Mapping[str, object], model: str | None, task: str, rpc: str):
        if not models:
            raise NoModelForTaskError(f"{rpc} is not available: this server hosts no {task} model")
        name = model or next(iter(models))
        if name not in models:
            available = ", ".join(sorted(models))
            raise ModelNotFoundError(f"no {task} model named {name!r}; available: {available}")
        return name, models[name]

    # ------------------------------------------------------------------ generation

    async def stream_reply(
        self, text: str, options: GenerationOptions | None = None, model: str | None = None
    ) -> AsyncIterator[TokenDelta | ReplyDone]:
        """Yield a :class:`TokenDelta` per generated token, then exactly one :class:`ReplyDone`.

        Raises :class:`InvalidRequestError`, :class:`ModelNotFoundError` or
        :class:`NoModelForTaskError` before the first token. Close the iterator
        (``aclose()`` or ``contextlib.aclosing``) to stop the model early.
        """
        self.check_text(text)
        options = options or GenerationOptions()
        try:
            options.validate()
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        name, gen = self._resolve(self.generators, model, "generation", "Reply")

        loop = asyncio.get_running_loop()
        # Unbounded: the model is the slow side, so the queue holds at most the tokens of one
        # event-loop hiccup, and a bound would make the worker block where it cannot see `stop`.
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def push(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        def work() -> None:
            with self._cond:
                self._active += 1
            outcome = "failed"
            try:
                if stop.is_set():  # the consumer left while this request waited for a worker
                    outcome = "cancelled"
                    return
                prompt_tokens = gen.count_tokens(text)
                if prompt_tokens > gen.max_input_tokens:
                    raise InvalidRequestError(
                        f"text is {prompt_tokens} tokens long; model {name!r} accepts at most "
                        f"{gen.max_input_tokens} input tokens"
                    )
                push((_START, prompt_tokens))
                n = 0
                stream = gen.stream(text, options)
                try:
                    for delta in stream:
                        # Checked after each token: a cancelled request costs at most one more token.
                        if stop.is_set():
                            break
                        n += 1
                        push((_DELTA, delta))
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
                if stop.is_set():
                    outcome = "cancelled"
                    return
                outcome = "completed"
                reason = "length" if n >= options.max_new_tokens else "stop"
                push((_END, ReplyDone(reason, prompt_tokens, n, name)))
            except InvalidRequestError as e:
                outcome = "rejected"
                push((_ERROR, e))
            except BaseException as e:  # every failure must reach the consumer, which maps it to a status
                logger.error("model %r failed while generating", name, exc_info=True)
                push((_ERROR, e))
            finally:
                with self._cond:
                    self._active -= 1
                    if outcome == "completed":
                        self._completed += 1
                    elif outcome == "cancelled":
                        self._cancelled += 1
                    elif outcome == "failed":
                        self._failed += 1
                    self._cond.notify_all()
                logger.debug("reply worker finished", extra={"model": name, "outcome": outcome})

        self._check_open()
        future = loop.run_in_executor(self._executor, work)
        # close() cancels queued work; without this the consumer would wait for a worker that never runs.
        future.add_done_callback(
            lambda f: f.cancelled() and push((_ERROR, EngineShutdownError("the server is shutting down")))
        )
        try:
            while True:
                kind, payload = await queue.get()
                if kind == _DELTA:
                    yield payload
                elif kind == _START:
                    continue
                elif kind == _END:
                    yield payload
                    return
                else:
                    raise payload
        finally:
            # Runs on normal end, on error, and when the consumer closes us (cancel/deadline).
            # The worker is not awaited: it may be mid-token, and it exits on its own.
            stop.set()

    # ------------------------------------------------------------------ classification

    async def classify(self, texts: list[str], model: str | None = None) -> list[ClassPrediction]:
        """Classify each text with the named (or default) classifier, in a worker thread."""
        if isinstance(texts, str):
            raise InvalidRequestError("texts must be a list of strings, not a single string")
        if not texts:
            raise InvalidRequestError("texts is empty; allowed: at least one text")
        for i, t in enumerate(texts):
            self.check_text(t, field="text" if len(texts) == 1 else f"texts[{i}]")
        name, clf = self._resolve(self.classifiers, model, "classification", "Classify")
        loop = asyncio.get_running_loop()
        self._check_open()
        preds = await loop.run_in_executor(self._executor, clf.classify, list(texts))
        if len(preds) != len(texts):
            raise RuntimeError(f"classifier {name!r} returned {len(preds)} predictions for {len(texts)} texts")
        return preds

