"""Server interceptor: request ids, one log line per call, domain errors -> status codes.

The request id is returned in the response headers (with the first message) and in the
trailers (always, errors included).

Why the error mapping lives here and works for streaming RPCs too: a grpc.aio
interceptor only receives the method handler, not the call, so it wraps the
handler's behaviour function (a coroutine, or an async generator for handlers
that ``yield``) and sees every exception the servicer raises, including those
raised mid-stream. The servicer therefore just raises the engine's exceptions and
this module is the ONE place that turns them into status codes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import Callable

import grpc
import grpc.aio

from chatforge.context import (
    REQUEST_ID_METADATA_KEY,
    SESSION_ID_METADATA_KEY,
    new_request_id,
    request_id_var,
    session_id_var,
)
from chatforge.serving.engine import (
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    NoModelForTaskError,
)

logger = logging.getLogger(__name__)

# Checked in order; the first matching class wins.
STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NoModelForTaskError, grpc.StatusCode.UNIMPLEMENTED),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
)

# A client-chosen id ends up in logs: accept only short, plain ids, otherwise make our own.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def status_for(exc: BaseException, request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by a handler.

    Unknown exceptions become INTERNAL with a generic message (and the request id, so
    the operator can find the traceback in the log): internals never reach the client.
    """
    for cls, code in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return code, str(exc)
    suffix = f" (request id {request_id})" if request_id else ""
    return grpc.StatusCode.INTERNAL, f"internal error{suffix}"


def pick_request_id(metadata) -> str:
    """The caller's ``x-request-id`` if it is a plain id, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA_KEY and isinstance(value, str) and _VALID_REQUEST_ID.match(value):
            return value
    return new_request_id()


def _metadata_value(metadata, wanted: str) -> str | None:
    for key, value in metadata or ():
        if key == wanted and isinstance(value, str):
            return value[:128]
    return None


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets the request id, echoes it in initial metadata, logs each call, maps errors.

    Each call produces one INFO record on ``chatforge.serving.interceptors`` with
    ``extra`` fields ``rpc``, ``grpc_code``, ``latency_ms``, ``request_id``, ``session_id``.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return None
        metadata = handler_call_details.invocation_metadata
        rpc = handler_call_details.method
        request_id = pick_request_id(metadata)
        session_id = _metadata_value(metadata, SESSION_ID_METADATA_KEY)

        for kind, factory in _HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            wrapped = _wrap(behavior, rpc, request_id, session_id)
            if wrapped is None:  # a sync handler (run in a thread): leave it alone
                return handler
            return factory(
                wrapped,
                request_deserializer=handler.request_deserializer,
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

    def __init__(self, rpc: str, request_id: str, session_id: str | None) -> None:
        self.rpc, self.request_id, self.session_id = rpc, request_id, session_id
        self.start = time.perf_counter()
        self.tokens: list = []

    def enter(self, context) -> None:
        # Set inside the handler's task so every log line of this call (API and engine) sees it.
        self.tokens = [request_id_var.set(self.request_id), session_id_var.set(self.session_id)]
        # The id always travels in the trailers (errors included); see _IdContext for the headers.
        context.set_trailing_metadata(self.metadata)

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
        await context.abort(code, message, self.metadata)

    def exit(self, context, code: grpc.StatusCode | None) -> None:
        if code is None:
            code = context.code() or grpc.StatusCode.OK
        latency_ms = (time.perf_counter() - self.start) * 1000.0
        logger.info(
            "rpc %s %s %.1fms", self.rpc, code.name, latency_ms,
            extra={
                "rpc": self.rpc,
                "grpc_code": code.name,
                "latency_ms": round(latency_ms, 3),
                "request_id": self.request_id,
                "session_id": self.session_id,
            },
        )
        for var, token in zip((request_id_var, session_id_var), self.tokens, strict=False):
            var.reset(token)


class _IdContext:
    """The servicer context, plus: the request id rides on the response headers, sent lazily.

    Why lazily: gRPC commits a call (and never retries it) once response headers arrive.
    Sending headers up front would make every error non-retryable; sent with the first
    message instead, an error before it is a trailers-only response that the client's
    retry policy can retry (e.g. UNAVAILABLE while the models load).
    """

    def __init__(self, context, metadata) -> None:
        self._context = context
        self._metadata = metadata
        self._sent = False

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def ensure_initial_metadata(self) -> None:
        if not self._sent:
            self._sent = True
            await self._context.send_initial_metadata(self._metadata)

    async def send_initial_metadata(self, metadata) -> None:
        # A handler sending its own headers: add the request id to them.
        self._sent = True
        await self._context.send_initial_metadata(tuple(metadata) + self._metadata)

    async def write(self, message) -> None:
        await self.ensure_initial_metadata()
        await self._context.write(message)


def _code_of(exc: BaseException, context) -> grpc.StatusCode | None:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return None  # AbortError: the code was set on the context by abort()


def _wrap(behavior, rpc: str, request_id: str, session_id: str | None):
    if inspect.isasyncgenfunction(behavior):

        async def wrapped_gen(request, context):
            scope = _CallScope(rpc, request_id, session_id)
            code = None
            scope.enter(context)
            ctx = _IdContext(context, scope.metadata)
            try:
                async for response in behavior(request, ctx):
                    await ctx.ensure_initial_metadata()
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
            scope = _CallScope(rpc, request_id, session_id)
            code = None
            scope.enter(context)
            ctx = _IdContext(context, scope.metadata)
            try:
                response = await behavior(request, ctx)
                await ctx.ensure_initial_metadata()
                return response
            except (asyncio.CancelledError, grpc.aio.AbortError) as e:
                code = _code_of(e, context)
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status, logged if unexpected
                await scope.fail(e, context)
            finally:
                scope.exit(context, code)

        return wrapped

    return None
