"""Server interceptor: request ids, auth, drain gate, one log line and metrics per call,
domain errors -> status codes, alerts on unexpected errors.

The request id is returned in the trailers (always, errors included), and in the headers only
when a handler sends headers of its own (see :class:`_IdContext`).

Why the error mapping lives here and works for streaming RPCs too: a grpc.aio
interceptor only receives the method handler, not the call, so it wraps the
handler's behaviour function (a coroutine, or an async generator for handlers
that ``yield``) and sees every exception the servicer raises, including those
raised mid-stream. The servicer therefore just raises the engine's exceptions and
this module is the ONE place that turns them into status codes.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import weakref
from collections.abc import Callable

import grpc
import grpc.aio

from chatforge.context import (
    MAX_SESSION_ID_CHARS,
    REQUEST_ID_METADATA_KEY,
    SESSION_ID_METADATA_KEY,
    is_valid_request_id,
    new_request_id,
    request_id_var,
    session_id_var,
)
from chatforge.serving.engine import (
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    NoModelForTaskError,
    check_unicode,
)
from chatforge.serving.security import UnauthenticatedError

logger = logging.getLogger(__name__)

# Checked in order; the first matching class wins.
STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (EngineOverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NoModelForTaskError, grpc.StatusCode.UNIMPLEMENTED),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
)

# Status code -> the failure reason label of chatforge_request_failure_total.
FAILURE_REASON_BY_CODE: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "validation",
    grpc.StatusCode.NOT_FOUND: "validation",
    grpc.StatusCode.UNIMPLEMENTED: "validation",
    grpc.StatusCode.UNAUTHENTICATED: "validation",
    grpc.StatusCode.FAILED_PRECONDITION: "validation",
    grpc.StatusCode.OUT_OF_RANGE: "validation",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.UNAVAILABLE: "overloaded",
    grpc.StatusCode.CANCELLED: "cancelled",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
}
# The failure reason of a DEADLINE_EXCEEDED whose caller allowed less than the latency budget
# (alert_rules.is_server_fault): not the server's fault: left out of the dashboard's error ratio, as out of the alert's.
SHORT_DEADLINE_REASON = "short_deadline"


def failure_reason(code: grpc.StatusCode, call_stats, deadline_seconds: float | None) -> str | None:
    """The ``reason`` label of chatforge_request_failure_total for a call that ended with ``code`` (None for OK)."""
    if code is grpc.StatusCode.OK:
        return None
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and call_stats is not None \
            and not call_stats.is_server_fault(code.name, deadline_seconds):
        return SHORT_DEADLINE_REASON
    return FAILURE_REASON_BY_CODE.get(code, "internal")


CHATBOT_PREFIX = "/chatforge.v1.Chatbot/"

# A status's details travel percent-encoded in the trailers, and a gRPC client refuses trailers past 16 KiB: the
# call would then fail RESOURCE_EXHAUSTED "Stream removed" on the client, whatever the server answered. 1,000
# characters stay under that limit even when each is a 4-byte UTF-8 character encoded as %XX%XX%XX%XX.
MAX_DETAILS_CHARS = 1000


class DrainingError(EngineUnavailableError):
    """The server is draining (SIGTERM): new calls go elsewhere (UNAVAILABLE is retried)."""


class CallGate:
    """Counts in-flight Chatbot calls and refuses new ones once draining starts.

    Why not just ``server.stop(grace)``: stop() refuses *every* new RPC, health checks
    included, so a balancer could not read the readiness flip while the liveness service
    stays SERVING. Draining here refuses only Chatbot calls and lets health keep answering.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.draining:
            raise DrainingError("the server is draining (shutting down); retry on another replica")
        self.in_flight += 1
        self._idle.clear()

    def exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class CallInfo:
    """What the servicer tells the interceptor about a call (model, version, token timings).

    Reachable from the servicer as :data:`current_call` (a contextvar set for each call).
    """

    def __init__(self, rpc: str, metrics, start: float) -> None:
        self.rpc, self.metrics, self.start = rpc, metrics, start
        self.model: str | None = None
        self.session_id: str | None = None  # from the request message (ReplyRequest.session_id)
        self.started = False
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        # What the reply's last item (the engine's ReplyDone) said: the model that answered (with a reply policy
        # not always the one the call was admitted to, ``model``: retrieval, a scripted answer or the fallback), the
        # path and the out-of-scope verdict; None until then, and for other RPCs.
        self.answered_by: str | None = None
        self.path: str | None = None
        self.out_of_scope: bool | None = None

    def set_model(self, name: str) -> None:
        if self.model is None:
            self.model = name
            if self.metrics is not None:
                self.metrics.request_started(self.rpc, name)
                self.started = True

    def answered(self, model: str, path: str, finish_reason: str, out_of_scope: bool) -> None:
        """The reply's ReplyDone: ``path`` as the engine says it ("" without a policy: generation, or the
        pipeline's fallback when ``finish_reason`` is "fallback")."""
        self.answered_by = model
        self.path = path or ("fallback" if finish_reason == "fallback" else "generation")
        self.out_of_scope = out_of_scope
        if self.metrics is not None:
            self.metrics.reply_answered(self.path, model, out_of_scope)

    def log_fields(self) -> dict:
        """The access log line's model fields: ``model`` is the model that answered once known (the one the
        client's ReplyFinal and the conversation store name), ``path`` and ``out_of_scope`` how."""
        if self.answered_by is None:
            return {"model": self.model or None}
        return {"model": self.answered_by or None, "path": self.path, "out_of_scope": self.out_of_scope}

    def token(self) -> None:
        now = time.perf_counter()
        if self.metrics is not None and self.model is not None:
            if self.first_token_at is None:
                self.metrics.first_token(self.rpc, self.model, now - self.start)
            else:
                self.metrics.token(self.model, now - self.last_token_at)
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.start) * 1000.0


current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("chatforge_call", default=None)


def status_for(exc: BaseException, request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by a handler.

    Unknown exceptions become INTERNAL with a generic message (and the request id, so
    the operator can find the traceback in the log): internals never reach the client.
    """
    for cls, code in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            message = str(exc)
            if len(message) > MAX_DETAILS_CHARS:
                message = message[:MAX_DETAILS_CHARS - 3] + "..."
            return code, message
    suffix = f" (request id {request_id})" if request_id else ""
    return grpc.StatusCode.INTERNAL, f"internal error{suffix}"


def pick_request_id(metadata) -> str:
    """The caller's ``x-request-id`` if it is a plain id, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA_KEY and is_valid_request_id(value):
            return value
    return new_request_id()


def _metadata_value(metadata, wanted: str) -> str | None:
    for key, value in metadata or ():
        if key == wanted and isinstance(value, str):
            return value
    return None


def check_session_id(session_id: str, field: str) -> None:
    """A session id longer than ``MAX_SESSION_ID_CHARS`` or holding a NUL is refused, naming ``field``."""
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidRequestError(f"{field} is {len(session_id)} characters long; "
                                  f"allowed: at most {MAX_SESSION_ID_CHARS}")
    check_unicode(session_id, field)


class MalformedRequest:
    """What a request's bytes decode to when they are not a valid message (see :func:`_tolerant`)."""

    def __init__(self, message_name: str, error: BaseException) -> None:
        self.message_name, self.error = message_name, error


def _tolerant(deserializer):
    """Wrap a request deserializer so that bad bytes become a :class:`MalformedRequest` value.

    Why: grpc runs the deserializer before any handler or interceptor code, and when it raises,
    grpc answers UNKNOWN with the Python exception class in the message, logs an ERROR traceback
    and bypasses the interceptor (no log line of ours, no metric). Handing the failure on as a value
    lets the wrapped handler answer INVALID_ARGUMENT, log a WARNING and count the call like any other.
    """
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is bound to the class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_name = getattr(descriptor, "full_name", None) or "request message"

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and friends: the client's bytes are bad
            return MalformedRequest(message_name, e)

    return deserialize


def _check_request(request, scope: _CallScope) -> None:
    if isinstance(request, MalformedRequest):
        logger.warning("malformed request to %s: not a valid %s (%s)", scope.rpc, request.message_name,
                       request.error, extra={"rpc": scope.rpc, "request_id": scope.request_id})
        raise InvalidRequestError(f"request is not a valid {request.message_name}")


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets the request id, echoes it in the trailers, logs each call, maps errors.

    Each call produces one record on ``chatforge.serving.interceptors`` (INFO for Chatbot
    calls, DEBUG for health and reflection, which balancers call every second) with
    ``extra`` fields ``rpc``, ``grpc_code``, ``latency_ms``, ``request_id``, ``session_id``,
    ``model``. Optional collaborators: ``metrics`` (ServingMetrics hooks), ``alerts``
    (AlertManager: unexpected errors), ``auth`` (:class:`chatforge.serving.security.ApiKeyAuth`),
    ``gate`` (:class:`CallGate`: drain).
    """

    def __init__(self, *, metrics=None, alerts=None, auth=None, gate: CallGate | None = None,
                 call_stats=None) -> None:
        self.metrics, self.alerts, self.auth, self.gate = metrics, alerts, auth, gate
        self.call_stats = call_stats  # RollingCallStats for the error-rate / p99 alert rules

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return None
        metadata = handler_call_details.invocation_metadata
        rpc = handler_call_details.method
        request_id = pick_request_id(metadata)
        session_id = _metadata_value(metadata, SESSION_ID_METADATA_KEY)
        session_error = None
        if session_id is not None:
            try:
                check_session_id(session_id, SESSION_ID_METADATA_KEY)
            except InvalidRequestError as e:  # refused in admit(), once the call's scope exists
                session_error, session_id = e, None

        for kind, factory in _HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            scope = _CallScope(self, rpc, request_id, session_id, metadata, session_error)
            wrapped = _wrap(behavior, scope, streaming_request=kind.startswith("stream_"))
            if wrapped is None:  # a sync handler (run in a thread): leave it alone
                return handler
            # grpc drops the handler when the call ends; if it never ran, grpc ended the call itself (see
            # _ended_unhandled): the only trace such a call leaves in this process.
            weakref.finalize(wrapped, _ended_unhandled, scope).atexit = False
            return factory(
                wrapped,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


_HANDLER_KINDS: tuple[tuple[str, Callable], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


class _CallScope:
    """Per-call bookkeeping shared by the coroutine and async-generator wrappers."""

    def __init__(self, owner: RequestContextInterceptor, rpc: str, request_id: str, session_id: str | None,
                 invocation_metadata, session_error: InvalidRequestError | None = None) -> None:
        self.owner, self.rpc, self.request_id, self.session_id = owner, rpc, request_id, session_id
        self.session_error = session_error
        self.invocation_metadata = invocation_metadata
        self.is_chatbot = rpc.startswith(CHATBOT_PREFIX)
        self.short_rpc = rpc.rsplit("/", 1)[-1]
        self.tokens: list = []
        self.gated = False
        self.entered = False  # the handler ran (see _ended_unhandled)
        self._finished = False
        self.error: BaseException | None = None

    def enter(self, context) -> None:
        # Fresh per call: a scope object is built per handler lookup, but be explicit about time.
        self.entered = True
        self.start = time.perf_counter()
        # What the caller's deadline left the call on arrival (None: no deadline): a DEADLINE_EXCEEDED is the
        # server's fault only when that was at least the latency budget (alert_rules.is_server_fault).
        self.deadline_seconds = _time_remaining(context)
        self.call = CallInfo(self.short_rpc, self.owner.metrics if self.is_chatbot else None, self.start)
        # Set inside the handler's task so every log line of this call (API and engine) sees it.
        self.tokens = [request_id_var.set(self.request_id), session_id_var.set(self.session_id),
                       current_call.set(self.call)]
        # The id always travels in the trailers (errors included); see _IdContext for the headers.
        context.set_trailing_metadata(self.metadata)

    def admit(self) -> None:
        """Auth, session header and drain checks; raise a domain error (mapped to a status by fail())."""
        if self.owner.auth is not None:
            self.owner.auth.check(self.rpc, self.invocation_metadata)
        if self.is_chatbot and self.session_error is not None:
            raise self.session_error
        if self.is_chatbot and self.owner.gate is not None:
            self.owner.gate.enter()
            self.gated = True

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_METADATA_KEY, self.request_id),)

    async def fail(self, exc: BaseException, context) -> None:
        """Turn ``exc`` into the call's status (raises grpc.aio.AbortError)."""
        code, message = status_for(exc, self.request_id)
        if code is grpc.StatusCode.INTERNAL:
            logger.error(
                "unhandled error in %s", self.rpc, exc_info=exc,
                extra={"rpc": self.rpc, "request_id": self.request_id},
            )
            if self.owner.alerts is not None:
                self.owner.alerts.alert_exception(exc, rpc=self.rpc, context={"request_id": self.request_id})
        # Counted before the status leaves: abort() sends it at once, and a client that saw its error
        # must find the call in the stats and metrics (exit() would run only after the send).
        self._finish(code)
        await context.abort(code, message, self.metadata)

    def exit(self, context, code: grpc.StatusCode | None) -> None:
        if not self._finished:
            if code is None:
                code = context.code() or grpc.StatusCode.OK
            if code is grpc.StatusCode.CANCELLED and _deadline_passed(context):
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            self._finish(code)
        for var, token in zip((request_id_var, session_id_var, current_call), self.tokens, strict=False):
            var.reset(token)

    def _finish(self, code: grpc.StatusCode) -> None:
        """Release the drain gate; record the call's stats, metrics and log line (once)."""
        self._finished = True
        seconds = time.perf_counter() - self.start
        latency_ms = seconds * 1000.0
        if self.gated:
            self.owner.gate.exit()
        model = self.call.model or ""
        call_stats = self.owner.call_stats
        if call_stats is not None and self.is_chatbot:
            call_stats.record(seconds, code.name, self.deadline_seconds)
        metrics = self.owner.metrics
        if metrics is not None and self.is_chatbot:
            if not self.call.started:  # failed before a model was chosen: count it all the same
                metrics.request_started(self.short_rpc, model)
            metrics.request_finished(self.short_rpc, model, code.name, seconds,
                                     reason=failure_reason(code, call_stats, self.deadline_seconds))
        logger.log(
            logging.INFO if self.is_chatbot else logging.DEBUG,
            "rpc %s %s %.1fms", self.rpc, code.name, latency_ms,
            extra={
                "rpc": self.rpc,
                "grpc_code": code.name,
                "latency_ms": round(latency_ms, 3),
                "request_id": self.request_id,
                "session_id": self.call.session_id or self.session_id,
                **self.call.log_fields(),
            },
        )


def _ended_unhandled(scope: _CallScope) -> None:
    """Called when grpc drops a call's handler: a handler that never ran means grpc ended the call before it.

    grpc looks the handler up (so this interceptor runs) when a call's headers arrive, and then, before calling
    it, receives the request message. A message over ``grpc.max_receive_message_length`` (``--max-message-bytes``)
    ends the call there with RESOURCE_EXHAUSTED, sent by grpc core; a client that cancels, or whose deadline passes,
    before its message arrives ends it there too. Neither reaches the handler, its log line or its metrics, and grpc
    says nothing of either in this process, nor which of the two it was: so this logs one line and counts
    ``chatforge_requests_unhandled_total``. (Streams grpc refuses before any lookup, past ``max_concurrent_streams``
    or the connection cap, leave no trace at all in this process: see docs/operations.md.)
    """
    if scope.entered:
        return
    try:
        logger.log(
            logging.INFO if scope.is_chatbot else logging.DEBUG,
            "rpc %s ended before its handler ran: grpc refused its request message (over the size limit, "
            "--max-message-bytes; the client got RESOURCE_EXHAUSTED) or the client left before sending it",
            scope.rpc, extra={"rpc": scope.rpc, "grpc_code": None, "request_id": scope.request_id,
                              "session_id": scope.session_id},
        )
        if scope.owner.metrics is not None:
            scope.owner.metrics.request_unhandled(scope.short_rpc)
    except Exception:  # noqa: BLE001 - a finalizer must not raise (Python would print it to stderr)
        logger.exception("recording a call grpc ended before its handler failed")


def _time_remaining(context) -> float | None:
    try:
        return context.time_remaining()
    except Exception:  # noqa: BLE001 - not every context implements it
        return None


def _deadline_passed(context) -> bool:
    remaining = _time_remaining(context)
    return remaining is not None and remaining <= 0


class _IdContext:
    """The servicer context, plus: headers a handler sends itself carry the request id.

    The interceptor never sends headers of its own. gRPC commits a call (and never retries it)
    once response headers arrive, so headers sent up front would make every error non-retryable
    (e.g. UNAVAILABLE while the models load); and headers sent just before the first message
    cost a round of thread wake-ups, 1-4 ms of time to first token (benchmarks/serving_bench.py).
    grpc sends its own headers with the first message; the request id rides in the trailers
    (and ``ReplyFinal.request_id``).
    """

    def __init__(self, context, metadata) -> None:
        self._context = context
        self._metadata = metadata

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def send_initial_metadata(self, metadata) -> None:
        # A handler sending its own headers: add the request id to them.
        await self._context.send_initial_metadata(tuple(metadata) + self._metadata)


def _code_of(exc: BaseException, context) -> grpc.StatusCode | None:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return None  # AbortError: the code was set on the context by abort()


async def _checked_requests(requests, scope: _CallScope):
    """A client stream's messages, each checked as :func:`_check_request` checks a unary request: a message that
    did not decode raises InvalidRequestError when the handler reaches it, instead of reaching the handler (the
    reflection servicer failed INTERNAL on it, with an ERROR and a critical alert)."""
    async for request in requests:
        _check_request(request, scope)
        yield request


def _wrap(behavior, scope: _CallScope, *, streaming_request: bool = False):
    if inspect.isasyncgenfunction(behavior):

        async def wrapped_gen(request, context):
            code = None
            scope.enter(context)
            ctx = _IdContext(context, scope.metadata)
            try:
                scope.admit()
                if streaming_request:
                    request = _checked_requests(request, scope)
                else:
                    _check_request(request, scope)
                # No separate headers for streams either (see _IdContext).
                async for response in behavior(request, ctx):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError) as e:
                code = _code_of(e, context)
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status, logged if unexpected
                await scope.fail(e, context)
            finally:
                scope.exit(context, code)

        return wrapped_gen

    if inspect.iscoroutinefunction(behavior):

        async def wrapped(request, context):
            code = None
            scope.enter(context)
            ctx = _IdContext(context, scope.metadata)
            try:
                scope.admit()
                if streaming_request:
                    request = _checked_requests(request, scope)
                else:
                    _check_request(request, scope)
                # No separate headers for unary calls: grpc then sends headers, the message and
                # the trailers (which carry the request id) in one batch. Headers sent on their
                # own commit the call, so a replica killed between the two writes failed a call
                # the client could otherwise have retried (tests/scenarios/test_replicas.py).
                return await behavior(request, ctx)
            except (asyncio.CancelledError, grpc.aio.AbortError) as e:
                code = _code_of(e, context)
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status, logged if unexpected
                await scope.fail(e, context)
            finally:
                scope.exit(context, code)

        return wrapped

    return None
