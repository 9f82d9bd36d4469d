"""The HTTP surface: OpenAI-compatible chat completions, Classify, health, OpenAPI and a chat page.

Served by ``chatforge serve --http-port N`` in the SAME process and on the SAME asyncio event loop
as the grpc.aio server (see docs/architecture.md for why not a separate gateway): the engine's
:class:`~chatforge.serving.engine.LoopSink` hands tokens to whichever loop submitted the request,
so both surfaces share one engine — its batching, backpressure, metrics, conversation store, API
keys (``Authorization: Bearer``) and drain gate (:class:`~chatforge.serving.interceptors.CallGate`).

Errors: handlers raise the engine's domain errors; :func:`chatforge.serving.interceptors.status_for`
(the one mapping from domain error to gRPC status) gives the code, and :data:`HTTP_STATUS_BY_CODE`
turns that code into an HTTP status and an OpenAI error object. So a domain error means the same
thing on both surfaces, and metrics/alert rules see the same code names.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/chat/completions``
(``stream`` false: one JSON object; true: SSE ``data:`` chunks ending with ``data: [DONE]``),
``POST /v1/classify``, ``GET /healthz`` (liveness), ``GET /readyz`` (readiness), ``GET /openapi.json``
and the chat page at ``/`` (static files shipped in ``serving/static``; no external assets).
"""

from __future__ import annotations

import asyncio
import email.message
import importlib.metadata
import itertools
import json
import logging
import math
import re
import socket
import ssl
import time
import unicodedata
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from datetime import datetime
from importlib import resources
from typing import Any, Literal

import grpc
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from chatforge.context import (
    CONTEXT_ROLES,
    MAX_CONTEXT_TURNS,
    REQUEST_ID_METADATA_KEY,
    SESSION_ID_METADATA_KEY,
    TRAFFIC_METADATA_KEY,
    request_id_var,
    session_id_var,
)
from chatforge.decoding import GenerationOptions
from chatforge.inference import TokenDelta
from chatforge.runtime import fd_budget
from chatforge.serving.engine import (
    Engine,
    InvalidRequestError,
    ModelNotFoundError,
    ReplyDone,
    check_unicode,
)
from chatforge.serving.interceptors import (
    CallInfo,
    check_session_id,
    current_call,
    failure_reason,
    pick_request_id,
    status_for,
)
from chatforge.serving.security import AUTH_METADATA_KEY
from chatforge.serving.service import ModelsLoadingError, traffic_of
from chatforge.serving.store import Turn

logger = logging.getLogger(__name__)

# gRPC status (from the one domain-error mapping) -> HTTP status, OpenAI error type, error code.
HTTP_STATUS_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", "model_not_found"),
    grpc.StatusCode.UNIMPLEMENTED: (404, "not_found_error", "no_model_for_task"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
    grpc.StatusCode.INTERNAL: (500, "server_error", "internal_error"),
}
# Seconds a client should wait before retrying a 429/503 (the engine frees slots within a step).
RETRY_AFTER_S = 1
# Engine/option field names -> the chat-completions request field a client sent.
CHAT_PARAMS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "text": "messages"}
_FIELD_PATH = re.compile(r"^[A-Za-z_][\w.\[\]-]*$")
TIMEOUT_HEADER = "x-request-timeout"  # seconds; the HTTP stand-in for a gRPC deadline
MAX_TIMEOUT_S = 3600.0
SEED_MAX = 2**63 - 1
MAX_STOP = 4
MAX_MESSAGES = 1000
# Content parts (``[{"type": "text", "text": ...}]``) in all of a request's messages. Each is validated in Python
# (ChatMessage._text_parts_only, a ContentPart model), about 10 us apiece on the event loop both surfaces share: a 4 MiB
# body of 150,000 empty parts held the loop for 1.6 s (JSON parsing of the same body: 0.13 s).
MAX_CONTENT_PARTS = 1000


class FieldError(InvalidRequestError):
    """A validation error that names the request field (``param`` of the OpenAI error object)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class DeadlineExceededError(Exception):
    """The ``X-Request-Timeout`` the client gave passed before the reply was complete."""


class ClientGoneError(Exception):
    """The client closed its connection before its (non-streamed) reply was complete."""


# ------------------------------------------------------------------------------------ schemas
class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


class ChatMessage(BaseModel):
    # OpenAI messages may carry more (name, tool_call_id, ...); those are accepted and ignored.
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        # Without this, an image part failed both branches of the union and the 400 named pydantic's first one
        # ("messages[0].content.str=list is invalid: Input should be a valid string").
        if isinstance(v, list):
            parts = []
            for j, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind == "refusal" and isinstance(part.get("refusal"), str):
                    # an earlier assistant turn the official client echoes back as it got it: its words are text
                    part = {"type": "text", "text": part["refusal"]}
                elif kind != "text":
                    raise ValueError(f"part {j} is of type {kind!r}: only text parts are supported; allowed: a "
                                     "string or a list of {'type': 'text', 'text': ...} parts (an assistant turn's "
                                     "{'type': 'refusal', 'refusal': ...} is read as text)")
                parts.append(part)
            return parts
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = Field(False, description="Send one more chunk with `usage` (and no choices) "
                                "before `data: [DONE]`.")


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completions request. Of the fields outside this list, those that would change the reply
    and that this server cannot honour (:data:`UNSUPPORTED_CHAT_PARAMS`: tools, JSON output, log-probabilities...)
    are a 400 unless they hold their neutral value; the others (``store``, ``metadata``...) are ignored.

    Strict types, as OpenAI's API checks them: ``"max_tokens": "5"`` or ``true`` is a 400 naming the field,
    not a quiet 5 or 1 (an integer is accepted where a number is)."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = Field(None, max_length=256, description="A generation model from /v1/models, or a "
                              "selection model (task 'selection': its best pool answer as the reply); omitted: "
                              "the server's default.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, description=(
        "The conversation; the last user message is the input. The messages before it are stored with the "
        "session, and a model trained with context (/v1/models: context_turns > 0) reads the latest user and "
        "assistant turns that fit its input before the input message."))
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (capped by the server).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    min_tokens: int | None = Field(None, ge=0, description="Fewest tokens to generate (an extension, as in "
                                   "vLLM; at most max_tokens). Benchmarks use it for fixed-length replies.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description=(
        "0 or omitted: greedy decoding (the server default); > 0: sampling at this temperature."))
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass (with temperature > 0).")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Seed for sampling: same seed, same reply.")
    repetition_penalty: float | None = Field(None, ge=1.0, le=10.0, description=(
        "CTRL's penalty on tokens already generated (an extension, as in vLLM); 1 or omitted: none."))
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=16, description=(
        "Never generate an n-gram of this size twice in one reply (an extension); 0 or omitted: off."))
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description=(
        "A token's logit loses this times its count in the reply so far; 0 or omitted: none."))
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description=(
        "A token's logit loses this once it occurs in the reply so far; 0 or omitted: none."))
    # n and stream are nullable in OpenAI's schema (null: the default), as every optional field here is.
    n: int | None = Field(1, ge=1, le=1, description="Number of choices; only 1 is supported (null: 1).")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} sequences where the reply ends "
                                         "(not included in it).")
    stream: bool | None = Field(False, description="true: Server-Sent Events (null: false).")
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true (as OpenAI's API).")
    user: str | None = Field(None, max_length=128, description="End-user id; the session id in the "
                             "conversation store unless an X-Session-Id header is sent.")

    @field_validator("messages", mode="before")
    @classmethod
    def _bounded_parts(cls, v: Any) -> Any:
        # counted before any part is validated; a list over MAX_MESSAGES is refused by its bound without this count
        if isinstance(v, list) and len(v) <= MAX_MESSAGES:
            parts = sum(len(m["content"]) for m in v if isinstance(m, dict) and isinstance(m.get("content"), list))
            if parts > MAX_CONTENT_PARTS:
                raise ValueError(f"the messages hold {parts} content parts in all; allowed: at most "
                                 f"{MAX_CONTENT_PARTS} (a message's content may be one string)")
        return v

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: Any) -> StreamOptions | None:
        # OpenAI answers 400 here; accepting it silently let a client believe it would get a usage chunk
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v


class ClassifyHttpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str = Field(min_length=1, description="The message to classify (not blank).")
    model: str | None = Field(None, max_length=256, description="A classifier; omitted: the default.")


class ClassifyHttpResponse(BaseModel):
    label: str
    score: float
    scores: dict[str, float]
    out_of_scope: bool
    model: str
    model_version: str
    request_id: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    task: str
    family: str
    version: str
    is_default: bool
    context_turns: int = Field(0, description="Earlier user/assistant turns the model reads before the input "
                               "message (0: the input message only).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReplyMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: ReplyMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatforgeInfo(BaseModel):
    """chatforge's additions to a completion (OpenAI clients ignore unknown fields)."""

    model_version: str
    request_id: str
    intent: str | None = None
    intent_score: float | None = None
    out_of_scope: bool = False
    context_turns: int = Field(0, description="How many earlier turns of `messages` the model read.")
    path: str | None = Field(None, description="Reply policy only: which path answered (scripted, retrieval, "
                             "generation, fallback).")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    chatforge: ChatforgeInfo


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthStatus(BaseModel):
    status: str


_ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in (
    (400, "Invalid request; `error.param` names the field"),
    (401, "Missing or invalid API key (`Authorization: Bearer <key>`)"),
    (404, "Unknown model (or no model for the task)"),
    (413, "The request body is larger than the server's --max-message-bytes (4 MiB by default, as over gRPC)"),
    (429, "Overloaded: the model's running batch and queue are full; see Retry-After"),
    (503, "Loading models or draining; see Retry-After"),
    (504, "The X-Request-Timeout passed"),
)}
_SSE_DOC = ("`stream: true`: Server-Sent Events, one `data: <chat.completion.chunk JSON>` line per token, "
            "ending with `data: [DONE]`.")


# ------------------------------------------------------------------------------------- errors
def error_response(exc: BaseException, request_id: str | None,
                   params: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI error object and HTTP status for ``exc`` (a domain error or anything else)."""
    status, body = error_body(exc, request_id, params)
    headers = {REQUEST_ID_METADATA_KEY: request_id} if request_id else {}
    if status in (429, 503):
        headers["retry-after"] = str(RETRY_AFTER_S)
    if status == 401:  # RFC 9110: a 401 names the scheme it wants
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


def grpc_code_of(exc: BaseException, request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    return status_for(exc, request_id)


def error_body(exc: BaseException, request_id: str | None,
               params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error object). ``param`` names the request field: the one a
    :class:`FieldError` carries, else the field an engine message starts with ("text is empty"),
    renamed through ``params`` to what this endpoint calls it."""
    code, message = grpc_code_of(exc, request_id)
    status, kind, err_code = HTTP_STATUS_BY_CODE.get(code, HTTP_STATUS_BY_CODE[grpc.StatusCode.INTERNAL])
    param = getattr(exc, "param", None)
    if param is None and isinstance(exc, ModelNotFoundError):
        param = "model"
    if param is None and isinstance(exc, InvalidRequestError):
        head = message.split("=", 1)[0].split(" ", 1)[0].removeprefix("options.")
        if _FIELD_PATH.match(head):
            param = (params or {}).get(head, head)
    if code is grpc.StatusCode.UNAVAILABLE and "draining" in message:
        err_code = "draining"
    # A message may quote what the client sent, and JSON lets it send a lone surrogate ("\ud800"), which UTF-8 cannot
    # carry: shown escaped, or the error body itself failed to encode and the client got a bare 500.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if param is not None:
        param = param.encode("utf-8", "backslashreplace").decode("utf-8")
    return status, {"error": {"message": message, "type": kind, "param": param, "code": err_code}}


# How pydantic names the member of a union in an error's location ("messages[0].content.str",
# "stop.list[str]"): a type, never one of the schemas' field names (snake_case).
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|(list|dict|tuple|set)\[.*\]|[A-Z]\w*(\[.*\])?)$")


def _validation_param(loc: tuple) -> str:
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and _UNION_MEMBER.match(p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _validation_message(errors: list[dict]) -> tuple[str, str]:
    first = errors[0]
    param = _validation_param(tuple(first.get("loc", ())))
    if param == "body" and isinstance(first.get("input"), bytes):  # the raw body: its Content-Type is not JSON
        return "body", ("the request body was not read as JSON: its Content-Type header is not application/json "
                        "(curl -d sends application/x-www-form-urlencoded); allowed: Content-Type: application/json "
                        "or application/*+json")
    if first.get("type") == "json_invalid" or param == "body":
        return "body", f"the request body is not a valid JSON object of this endpoint's schema: {first.get('msg')}"
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return param, f"{param}={shown[:80]} is invalid: {first.get('msg')}"


# ------------------------------------------------------------------------------ request scope
class HttpCall:
    """Per-request bookkeeping, the HTTP twin of the gRPC interceptor's call scope.

    Sets the request/session id contextvars (each request runs in its own task, and the SSE
    body task is spawned from it, so they never leak), admits the call (API key, drain gate),
    and on :meth:`finish` records metrics, rolling call stats and one log line, exactly once.
    """

    def __init__(self, surface: HttpSurface, rpc: str, request: Request, session_id: str | None = None,
                 params: dict[str, str] | None = None) -> None:
        self.surface, self.rpc, self.params = surface, rpc, params
        self.request_id = pick_request_id([(REQUEST_ID_METADATA_KEY, request.headers.get(REQUEST_ID_METADATA_KEY))])
        header = request.headers.get(SESSION_ID_METADATA_KEY) or None
        field = "X-Session-Id header" if header is not None else "user"
        self.session_id = header or session_id or None
        self._session_error: InvalidRequestError | None = None
        if self.session_id is not None:
            try:  # refused in admit(): never cut, or two sessions sharing 128 characters would merge
                if header is not None and not header.isascii():
                    # HTTP gives header bytes as latin-1; a client sends UTF-8, as it sends `user` in the body, so the
                    # id is read as UTF-8: the same id by header or by `user` is one conversation, not mojibake
                    try:
                        self.session_id = header.encode("latin-1").decode("utf-8")
                    except UnicodeError:
                        raise InvalidRequestError(f"{field} is not UTF-8 text") from None
                check_session_id(self.session_id, field)
            except InvalidRequestError as e:
                self._session_error, self.session_id = e, None
        self.start = time.perf_counter()
        self.info = CallInfo(rpc, surface.metrics, self.start)
        self.gated = False
        self.finished = False
        self.deadline: float | None = None
        self._timeout_header = request.headers.get(TIMEOUT_HEADER)
        self._traffic_header = request.headers.get(TRAFFIC_METADATA_KEY)
        self.traffic: str | None = None  # synthetic traffic (a load test's): flagged in the store, see admit()
        request_id_var.set(self.request_id)
        session_id_var.set(self.session_id)
        current_call.set(self.info)

    def use_session(self, session_id: str | None) -> None:
        """The session id a request's body names (its ``user``), read once the body is parsed; the
        ``X-Session-Id`` header, when sent, wins."""
        if self.session_id is None and self._session_error is None and session_id:
            check_session_id(session_id, "user")  # the body's schema bounds its length; NUL is refused here
            self.session_id = session_id
            session_id_var.set(self.session_id)

    def admit(self, auth_header: str | None) -> None:
        """API key, then the drain gate, then the deadline header; raises a domain error. Called before a
        request's body is parsed: a client without a valid key gets 401 whatever it sent."""
        self.surface.check_key(auth_header)
        if self._session_error is not None:
            raise self._session_error
        if self._traffic_header is not None:
            self.traffic = traffic_of([(TRAFFIC_METADATA_KEY, self._traffic_header)])
        self.deadline = _deadline(self._timeout_header, self.start)
        gate = self.surface.gate
        if gate is not None:
            gate.enter()
            self.gated = True

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.perf_counter()

    def finish(self, code: grpc.StatusCode, http_status: int) -> None:
        if self.finished:
            return
        self.finished = True
        seconds = time.perf_counter() - self.start
        if self.gated:
            self.surface.gate.exit()
        model = self.info.model or ""
        call_stats = self.surface.call_stats
        allowed = None if self.deadline is None else self.deadline - self.start  # X-Request-Timeout
        if call_stats is not None:
            call_stats.record(seconds, code.name, allowed)
        metrics = self.surface.metrics
        if metrics is not None:
            if not self.info.started:
                metrics.request_started(self.rpc, model)
            metrics.request_finished(self.rpc, model, code.name, seconds,
                                     reason=failure_reason(code, call_stats, allowed))
        logger.info("http %s %d %s %.1fms", self.rpc, http_status, code.name, seconds * 1000.0, extra={
            "rpc": self.rpc, "http_status": http_status, "grpc_code": code.name,
            "latency_ms": round(seconds * 1000.0, 3), "request_id": self.request_id,
            "session_id": self.session_id, **self.info.log_fields()})

    def fail(self, exc: BaseException) -> JSONResponse:
        code, _ = grpc_code_of(exc, self.request_id)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("unhandled error in %s", self.rpc, exc_info=exc,
                         extra={"rpc": self.rpc, "request_id": self.request_id})
            if self.surface.alerts is not None:
                self.surface.alerts.alert_exception(exc, rpc=self.rpc, context={"request_id": self.request_id})
        response = error_response(exc, self.request_id, self.params)
        self.finish(code, response.status_code)
        return response


# A decimal number of seconds, as HTTP headers write numbers: Python's float() would also read "1_0" (10),
# " 5 ", "1e3" or "infinity".
_SECONDS = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")


def _deadline(raw: str | None, start: float) -> float | None:
    if raw is None:
        return None
    seconds = float(raw) if _SECONDS.fullmatch(raw) else math.nan
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise FieldError("X-Request-Timeout", f"X-Request-Timeout={raw[:40]!r} is invalid; allowed: seconds "
                         f"in (0, {MAX_TIMEOUT_S:g}]")
    return start + seconds


# --------------------------------------------------------------------------------- the request
def message_text(msg: ChatMessage) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    return "".join(part.text for part in msg.content)


def last_user_message(messages: list[ChatMessage]) -> tuple[int, str]:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            return i, message_text(messages[i])
    raise FieldError("messages", "messages holds no message with role 'user'; allowed: at least one user "
                     "message (the last one is the input)")


def earlier_messages(messages: list[ChatMessage], index: int, engine: Engine) -> list[tuple[str, str]]:
    """The messages before the input one, as (role, text). User and assistant turns, which a model that
    reads context may read, are checked as the input is (naming their index); system and developer
    messages are kept for the store as sent, however long (OpenAI clients send long system prompts). Messages without text (an assistant's tool calls, a tool result with no
    content) carry no turn and are left out."""
    out = []
    for i, msg in enumerate(messages[:index]):
        text = message_text(msg)
        if msg.role == "tool" or not text.strip():
            continue
        if msg.role in CONTEXT_ROLES:  # what a model may read; a system prompt is only stored (the body
            engine.check_text(text, field=f"messages[{i}].content")  # limit bounds it, as it bounds all)
        else:  # stored as UTF-8: a lone surrogate would fail the store's write (and its batch)
            check_unicode(text, field=f"messages[{i}].content")
        out.append((msg.role, text))
    return out


def _is_zero(v: Any) -> bool:
    return v is None or (type(v) in (int, float) and v == 0)


# OpenAI chat parameters that change what comes back, which no chatforge model can honour: name -> (whether a
# value is the neutral one SDKs send by default, the neutral values, what is not supported). Accepting them
# quietly answered a client that asked for JSON, tool calls or log-probabilities with a plain 200 reply.
UNSUPPORTED_CHAT_PARAMS: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "tools": (lambda v: v is None or v == [], "omitted or []", "tool calling"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "omitted, 'none' or 'auto'", "tool calling"),
    "functions": (lambda v: v is None or v == [], "omitted or []", "function calling"),
    "function_call": (lambda v: v in (None, "none", "auto"), "omitted, 'none' or 'auto'", "function calling"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "omitted or {'type': 'text'}",
                        "structured output (JSON mode, JSON schemas)"),
    "logprobs": (lambda v: v is None or v is False, "omitted or false", "log-probabilities"),
    "top_logprobs": (_is_zero, "omitted or 0", "log-probabilities"),
    "logit_bias": (lambda v: v is None or v == {}, "omitted or {}", "logit bias"),
    "modalities": (lambda v: v is None or v == ["text"], "omitted or ['text']", "output other than text"),
    "audio": (lambda v: v is None, "omitted", "audio output"),
}


def check_supported(req: ChatCompletionRequest) -> None:
    """400 (naming the field and its allowed values) for a parameter of :data:`UNSUPPORTED_CHAT_PARAMS` that
    does not hold its neutral value."""
    for name, value in (req.model_extra or {}).items():
        rule = UNSUPPORTED_CHAT_PARAMS.get(name)
        if rule is not None and not rule[0](value):
            raise FieldError(name, f"{name}={_shown(value)} is not supported: {rule[2]}; allowed: {rule[1]}")


def _shown(value: Any, limit: int = 80) -> str:
    """The start of ``value`` as JSON, at most ``limit`` characters: a large container is cut to its first items
    before it is serialised (the whole of a 300,000-key logit_bias was, on the event loop, to show 80 characters)."""
    head = value
    if isinstance(value, dict) and len(value) > limit:
        head = dict(itertools.islice(value.items(), limit))
    elif isinstance(value, list) and len(value) > limit:
        head = value[:limit]
    return json.dumps(head, ensure_ascii=False)[:limit]


def generation_options(req: ChatCompletionRequest, engine: Engine) -> GenerationOptions:
    """The request's sampling fields -> validated GenerationOptions, errors naming the OpenAI field."""
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = min(GenerationOptions.max_new_tokens, engine.max_new_tokens)
    elif max_tokens > engine.max_new_tokens:
        raise FieldError(field, f"{field}={max_tokens} is out of range; this server allows at most "
                         f"{engine.max_new_tokens}")
    fields: dict[str, Any] = {"max_new_tokens": max_tokens}
    if req.min_tokens is not None:
        if req.min_tokens > max_tokens:  # in this API's names, with the limit (the default, when none was sent)
            given = req.max_completion_tokens is not None or req.max_tokens is not None
            raise FieldError("min_tokens", f"min_tokens={req.min_tokens} is out of range; allowed: at most {field}, "
                             f"{max_tokens}" + ("" if given else " (the default; send max_tokens to raise it)"))
        fields["min_new_tokens"] = req.min_tokens
    if req.temperature:  # 0 and None: greedy, as the gRPC surface's default
        fields.update(do_sample=True, temperature=req.temperature)
    if req.top_p is not None:
        fields["top_p"] = req.top_p
    if req.seed is not None:
        fields["seed"] = req.seed
    if req.repetition_penalty is not None:
        fields["repetition_penalty"] = req.repetition_penalty
    if req.no_repeat_ngram_size is not None:
        fields["no_repeat_ngram_size"] = req.no_repeat_ngram_size
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):  # 0 and None: off (what SDKs send by default)
            fields[name] = getattr(req, name)
    try:
        return GenerationOptions(**fields).validate()
    except ValueError as e:
        head = str(e).split("=", 1)[0]
        raise FieldError(CHAT_PARAMS.get(head, head), str(e)) from None


def stop_sequences(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise FieldError("stop", f"stop holds {len(stops)} sequences; allowed: at most {MAX_STOP}")
    for i, s in enumerate(stops):
        field = f"stop[{i}]" if not isinstance(stop, str) else "stop"
        if not s:
            raise FieldError(field, "a stop sequence is empty; allowed: non-empty strings")
        check_unicode(s, field)
    # Composed (NFC), as replies are: a stop sequence sent decomposed (NFD Hangul) would otherwise never match
    return [unicodedata.normalize("NFC", s) for s in stops]


class StopMatcher:
    """Cuts a streamed reply at the first stop sequence, holding back text that may begin one.

    ``feed`` returns the text that is safe to send and whether a stop sequence was hit; a
    reply with no stop sequences passes straight through.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:  # the longest tail of buf that is a proper prefix of a stop sequence
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out = self.buf[:len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _events(payloads: list[str]) -> bytes:
    """Several SSE ``data:`` events as one body write. A payload is one line (compact JSON, or
    ``[DONE]``), so an event is ``data: <payload>`` and a blank line."""
    return "".join(f"data: {p}\n\n" for p in payloads).encode()


# ------------------------------------------------------------------------------ the lean paths
# POST /v1/chat/completions is the hot path: it is served by a plain Starlette route, not by
# FastAPI's dependency solver (measured in-process: the body read + validation + dependency
# machinery and sse-starlette's per-response task group with its per-send cancel scopes cost
# about 0.4 ms before the first token and several microseconds per token). FastAPI still
# documents it (the OpenAPI document is generated from a documentation-only route with the
# same signature) and its exception handlers still turn errors into the same responses.
# POST /v1/classify is served the same way, for another reason: FastAPI parses and validates a body
# parameter before the handler runs, so a client without a valid API key had its body parsed and got a
# 400 describing the schema instead of a 401. Both handlers now check the key first (HttpCall.admit) and
# parse the body after (HttpSurface._parsed).
_CHAT_REQUEST = TypeAdapter(ChatCompletionRequest)
_CLASSIFY_REQUEST = TypeAdapter(ClassifyHttpRequest)


def _json_content_type(value: str | None) -> bool:
    """FastAPI's rule for which bodies are parsed as JSON: ``application/json`` or ``application/*+json``."""
    if value is None:
        return False
    if value == "application/json":
        return True
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


# What FastAPI says of a body it cannot decode (not UTF-8: Latin-1 text, a gzip body), which this API raises as well,
# and what the error object says instead: the cause and what is allowed.
_BODY_PARSE_ERROR = "There was an error parsing the body"
_BODY_NOT_UTF8 = ("the request body is not UTF-8 text (Latin-1, or compressed with a Content-Encoding such as gzip, "
                  "which this server does not decode); allowed: a JSON body in UTF-8, not compressed")


def parse_body(adapter: TypeAdapter, raw: bytes, content_type: str | None, levels: int) -> Any:
    """The request body as FastAPI would read and validate it for a body parameter of ``adapter``'s type (the
    same error types, locations and messages), in one pydantic call. ``levels``: how deeply that type nests
    (said in the message for JSON nested too deeply for Python's parser)."""
    body: Any = raw
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required",
                                       "input": None}], body=None)
    if _json_content_type(content_type):
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos),
                                           "msg": "JSON decode error", "input": {}, "ctx": {"error": e.msg}}],
                                         body=e.doc) from None
        except UnicodeDecodeError:  # not UTF-8 (FastAPI's answer to a body it cannot parse)
            raise StarletteHTTPException(status_code=400, detail=_BODY_PARSE_ERROR) from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts (4,300)
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "input": {},
                                           "msg": f"JSON decode error: {str(e).split(': ')[0]}"}],
                                         body=None) from None
        except RecursionError:  # arrays/objects nested ~1000 deep: FastAPI's own parser answers 400 too
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "input": {},
                                           "msg": "arrays/objects nested too deeply to parse (this endpoint's "
                                                  f"schema needs {levels} levels)"}], body=None) from None
    try:
        return adapter.validate_python(body, from_attributes=True)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors, body=body) from None


def parse_chat_request(raw: bytes, content_type: str | None) -> ChatCompletionRequest:
    """A chat-completions body, validated as FastAPI would for ``body: ChatCompletionRequest``."""
    return parse_body(_CHAT_REQUEST, raw, content_type, 5)


def parse_classify_request(raw: bytes, content_type: str | None) -> ClassifyHttpRequest:
    """A classify body, validated as FastAPI would for ``body: ClassifyHttpRequest``."""
    return parse_body(_CLASSIFY_REQUEST, raw, content_type, 1)


PING_S = 15.0  # a comment line on an idle stream (as sse-starlette sent), so proxies keep it open
# No Connection header of our own: the server sets it (``close`` for HTTP/1.0 or a client that asked),
# and a fixed ``keep-alive`` beside it made the response say both.
_SSE_HEADERS = {"cache-control": "no-store", "x-accel-buffering": "no",
                "content-type": "text/event-stream; charset=utf-8"}


class SseResponse:
    """An SSE response (ASGI): each item of ``body`` (bytes, whole events) is one body write.

    A second task waits for ``http.disconnect`` and then cancels the response (the body's
    ``finally`` runs and closes the engine stream, dropping the sequence), and sends a comment
    line when the stream has been idle for :data:`PING_S`. Nothing else runs per event: no
    task group, lock or cancel scope per send (what sse-starlette did).
    """

    def __init__(self, body, headers: dict[str, str]) -> None:
        self.body = body
        self.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in {**headers, **_SSE_HEADERS}.items()]
        self.disconnected = False
        self.last_write = 0.0

    async def __call__(self, scope, receive, send) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        self.last_write = loop.time()
        watcher = loop.create_task(self._watch(receive, send, task, loop))
        try:
            async with aclosing(self.body) as body:
                async for data in body:
                    self.last_write = loop.time()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Our own cancel after the client went away: the body has ended (499 recorded);
            # end the response quietly. Any other cancel (server shutdown) propagates.
            if not self.disconnected or task.uncancel() > 0:
                raise
        finally:
            watcher.cancel()

    async def _watch(self, receive, send, task: asyncio.Task, loop) -> None:
        while True:
            try:
                async with asyncio.timeout(PING_S):
                    message = await receive()
            except TimeoutError:
                if loop.time() - self.last_write >= PING_S:
                    self.last_write = loop.time()
                    await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
                continue
            if message["type"] == "http.disconnect":
                self.disconnected = True
                task.cancel()
                return


async def _until_disconnect(receive) -> None:
    """Returns once the server says the client is gone (``http.disconnect``). Called after the body is read, so
    nothing else is taken from ``receive``."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """``work``'s result, or :class:`ClientGoneError` once the client disconnects first: ``work`` is cancelled (its
    engine stream closes and the batcher drops the sequence, or takes it back from the queue, as for a stream whose
    client left). Without this a non-streamed reply ran to its max_tokens for nobody (an SDK that timed out and
    retried held a slot each time), and so did a streamed one whose client left while it was queued, before the SSE
    response (which watches from its first token on) existed. The request's body must have been read.

    ``work`` runs in the calling task (no task of its own, on the streams' hot path): a watcher task cancels the
    caller on ``http.disconnect``, as :class:`SseResponse` does."""
    task = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _until_disconnect(request.receive)
        gone = True
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        # Our own cancel: the client is gone. Any other (server shutdown) propagates.
        if gone and task.uncancel() == 0:
            raise ClientGoneError("the client disconnected before the reply was complete") from None
        raise
    finally:
        watcher.cancel()


# ---------------------------------------------------------------------------------- the surface
GRPC_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # grpc's default receive limit, which --max-message-bytes sets


# A request's head (request line and headers) must arrive within this many seconds of its first byte,
# or the connection gets 408 and is closed: a client that trickles its headers in (slowloris) would
# otherwise hold its connection, and a file descriptor, for good (uvicorn has no such deadline; HAProxy's
# `timeout http-request 10s` is the same bound in front of the replicas).
REQUEST_HEAD_TIMEOUT_S = 10.0
# A request's body must arrive within this many seconds of its head, or the request gets 408 and the connection is
# closed: a client that stopped sending its body held its connection, descriptor and task for good, as trickled
# headers did (4 MiB, the body limit, in 30 s is about 140 kB/s; chat bodies are a few kB. HAProxy's
# `timeout http-request 10s` with `option http-buffer-request` bounds the whole request in front of the replicas).
REQUEST_BODY_TIMEOUT_S = 30.0
# A connection that has not sent a byte of its first request is closed after this, as an idle
# keep-alive one is (``timeout_keep_alive``; a browser may open one ahead of its first request).
IDLE_CONNECTION_TIMEOUT_S = 60.0
# The most bytes a request's head (request line and headers, up to the blank line that ends them) may take, or
# the connection gets 431 and is closed. uvicorn's httptools protocol has no such bound: the parser keeps an
# unfinished header line (and the URL) in memory, concatenating each read onto it, so one client sending
# `X-A: aaaa...` for the head timeout's 10 s held 150 MB, and a few such connections slowed every other request
# (the copies run on the event loop). Browsers and SDKs send a few kB; HAProxy's buffer (tune.bufsize) is 16 kB.
# Bodies are not counted here (BodyLimit bounds them).
MAX_REQUEST_HEAD_BYTES = 64 * 1024


def max_http_connections() -> int:
    """The most HTTP connections served at once: a quarter of the process's file-descriptor limit (at most
    4,096; ``runtime.fd_budget``, which gives the gRPC port half), so idle or hostile HTTP clients cannot take
    the descriptors gRPC, the store and the logs need ("Too many open files"); one over it gets 503 and is
    closed."""
    return fd_budget(0.25)


def _closing_error(status: str, message: str, kind: str, code: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 response carrying the OpenAI error object every other error of this API carries, for the
    protocol layer (no ASGI app behind it), after which the connection closes."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", "connection: close", *headers,
            f"content-length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_HEAD_TIMEOUT_RESPONSE = _closing_error("408 Request Timeout", "request headers not received in time; allowed: "
                                        f"{REQUEST_HEAD_TIMEOUT_S:g} s from a request's first byte",
                                        "timeout", "request_timeout")
_HEAD_TOO_LARGE_RESPONSE = _closing_error(
    "431 Request Header Fields Too Large", f"the request line and headers are over {MAX_REQUEST_HEAD_BYTES} "
    f"bytes; allowed: at most {MAX_REQUEST_HEAD_BYTES} bytes in all", "invalid_request_error",
    "request_header_fields_too_large")
_INVALID_REQUEST_RESPONSE = _closing_error(
    "400 Bad Request", "invalid HTTP request: the parser refused its request line, a header or its body framing "
    "(Content-Length, Transfer-Encoding); allowed: HTTP/1.1 as RFC 9112 writes it", "invalid_request_error",
    "invalid_http_request")
_TOO_MANY_RESPONSE = _closing_error("503 Service Unavailable", "too many connections; retry", "service_unavailable",
                                    "too_many_connections", f"retry-after: {RETRY_AFTER_S}")


def _address(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else ""


class _Http10Cycle(RequestResponseCycle):
    """uvicorn's request cycle for an HTTP/1.0 request. HTTP/1.0 has no chunked transfer coding (RFC 9112
    section 6.1: a server must not send it to a 1.0 client), yet uvicorn frames every reply of unknown length
    in chunks, so a 1.0 client read chunk sizes inside the SSE events. A reply without Content-Length is sent
    close-delimited instead: ``connection: close``, the body as it comes, and the end of the body is the end of
    the connection. Replies that carry a Content-Length go through uvicorn unchanged."""

    _close_delimited = False

    async def send(self, message) -> None:  # type: ignore[override]
        if not self.response_started and message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", [])}
            if (b"content-length" not in names and b"transfer-encoding" not in names
                    and self.scope["method"] != "HEAD" and message["status"] not in (204, 304)):
                self._close_delimited = True
                self.keep_alive = False  # uvicorn adds connection: close
                self.chunked_encoding = False  # ... and no transfer-encoding
            return await super().send(message)
        if not self._close_delimited or self.response_complete or message["type"] != "http.response.body":
            return await super().send(message)
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if body := message.get("body", b""):
            self.transport.write(body)
        if not message.get("more_body", False):
            self.response_complete = True
            self.message_event.set()
            self.transport.close()
            self.on_response()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds a server facing clients directly needs and uvicorn lacks:
    a deadline for each request's head (:data:`REQUEST_HEAD_TIMEOUT_S`; 408) and for the first byte of a new
    connection (:data:`IDLE_CONNECTION_TIMEOUT_S`), a cap on each request's head (:data:`MAX_REQUEST_HEAD_BYTES`;
    431) and on open connections (:func:`max_http_connections`; 503); and streamed replies to HTTP/1.0 clients
    close-delimited rather than chunked (:class:`_Http10Cycle`). Bodies are bounded by :class:`BodyLimit` and
    replies by the engine's deadlines."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        # What the current request's head may still take (the parser's callbacks reset it); None past its end.
        self._head_room: int | None = MAX_REQUEST_HEAD_BYTES
        limit = max_http_connections()
        if len(self.connections) > limit:  # this one included
            logger.warning("http connection refused: %d open, at most %d", len(self.connections) - 1, limit,
                           extra={"client": _address(self.client)})
            transport.write(_TOO_MANY_RESPONSE)
            transport.close()
            return
        self._head_timer = self.loop.call_later(IDLE_CONNECTION_TIMEOUT_S, self._idle_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _idle_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            logger.info("http request head not received in %.0f s; connection closed", REQUEST_HEAD_TIMEOUT_S,
                        extra={"client": _address(self.client)})
            self.transport.write(_HEAD_TIMEOUT_RESPONSE)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        """Feed the parser at most what is left of the head's allowance at a time, and refuse the request once the
        allowance is spent before the head's end: an endless header line is cut there, not buffered for the head
        timeout. Past the head, slices of the allowance's size: a request pipelined behind another inside one
        slice has its first bytes uncounted, so no head is buffered past twice the allowance."""
        view = memoryview(data)
        while view:
            room = self._head_room
            size = MAX_REQUEST_HEAD_BYTES if room is None else room  # room > 0 here
            part, view = view[:size], view[size:]
            if room is not None:
                self._head_room = room - len(part)  # before the parser's callbacks, which may reset it
            super().data_received(part)
            if self.transport.is_closing() or self.parser is None or self not in self.connections:
                return  # refused, lost, or handed to another protocol (an upgrade)
            if self._head_room is not None and self._head_room <= 0:
                self._head_too_large()
                return

    def _head_too_large(self) -> None:
        self._cancel_head_timer()
        logger.info("http request head over %d bytes; connection closed", MAX_REQUEST_HEAD_BYTES,
                    extra={"client": _address(self.client)})
        if self.cycle is None or self.cycle.response_complete:  # else it would land inside that response
            self.transport.write(_HEAD_TOO_LARGE_RESPONSE)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:  # type: ignore[override]
        """uvicorn's answer to bytes its parser refuses ("Invalid HTTP request received.", text/plain) as the API's
        error object, as this port's other refusals; never written into a response already under way (a request
        pipelined behind it), which is cut instead."""
        self._cancel_head_timer()
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_INVALID_REQUEST_RESPONSE)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, self._head_timeout)

    def on_headers_complete(self) -> None:
        self._head_room = None
        self._cancel_head_timer()
        super().on_headers_complete()
        cycle = self.cycle
        # The cycle's task has been created but not run yet, so its ``send`` is looked up after this swap.
        if type(cycle) is RequestResponseCycle and cycle.scope.get("http_version") == "1.0":
            cycle.__class__ = _Http10Cycle

    def on_message_complete(self) -> None:
        self._head_room = MAX_REQUEST_HEAD_BYTES  # the next request's head starts here
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


class BodyLimit:
    """ASGI layer: a request body larger than ``limit`` bytes gets 413 (the OpenAI error object) before any
    handler reads it, whether its Content-Length says so or its chunks add up to it; the rest of the app
    never buffers more than the limit. The body is read here and handed on in one piece (bodies are small:
    a chat request is a few kB), and later ``receive`` calls (an SSE stream watching for a disconnect) go to
    the server's."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if scope["method"] in ("GET", "HEAD", "OPTIONS") and declared in (None, b"0") \
                and b"transfer-encoding" not in headers:
            # No body. One that comes anyway is bounded as any other: answered at once, a GET's body was then taken
            # for as long as it trickled in (each byte reset the keep-alive timer), holding the connection for good.
            return await self.app(scope, receive, send)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, send, int(declared))
        chunks, size, first = [], 0, None
        try:
            async with asyncio.timeout(REQUEST_BODY_TIMEOUT_S):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # gone while sending: the app sees the disconnect
                        first = message
                        break
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.limit:
                        return await self._too_large(scope, send, size, at_least=True)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await self._too_slow(scope, send, size)
        pending = [first or {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _too_slow(self, scope, send, size: int) -> None:
        request_id = self._request_id(scope)
        logger.info("HTTP request body not received in %g s; connection closed", REQUEST_BODY_TIMEOUT_S,
                    extra={"request_id": request_id, "path": scope.get("path"), "received_bytes": size,
                           "client": _address(scope.get("client"))})
        body = {"error": {"message": f"request body not received in time; allowed: {REQUEST_BODY_TIMEOUT_S:g} s "
                                     f"from the end of the request's headers ({size} bytes arrived)",
                          "type": "timeout", "param": None, "code": "request_timeout"}}
        response = JSONResponse(body, status_code=408, headers={REQUEST_ID_METADATA_KEY: request_id,
                                                                  "connection": "close"})
        await response(scope, _no_receive, send)

    @staticmethod
    def _request_id(scope) -> str:
        headers = dict(scope["headers"])
        return pick_request_id([(REQUEST_ID_METADATA_KEY, headers.get(REQUEST_ID_METADATA_KEY.encode(),
                                                                      b"").decode("latin-1") or None)])

    async def _too_large(self, scope, send, size: int, at_least: bool = False) -> None:
        request_id = self._request_id(scope)
        many = f"more than {self.limit}" if at_least else str(size)
        body = {"error": {"message": f"the request body is {many} bytes; allowed: at most {self.limit} "
                                     "(the server's --max-message-bytes)", "type": "invalid_request_error",
                          "param": None, "code": "request_too_large"}}
        logger.warning("HTTP request body too large", extra={"request_id": request_id, "limit": self.limit,
                                                              "path": scope.get("path")})
        response = JSONResponse(body, status_code=413, headers={REQUEST_ID_METADATA_KEY: request_id,
                                                                  "connection": "close"})
        await response(scope, _no_receive, send)


async def _no_receive():
    return {"type": "http.disconnect"}


class HttpSurface:
    """The HTTP API and chat page of one :class:`~chatforge.serving.server.ChatbotServer`.

    ``backend`` is the server (read for ``engine``, ``gate``, ``auth``, ``metrics``, ``alerts``,
    ``store``, ``alert_rules`` and ``ready``), so both surfaces see one engine and one drain.
    :meth:`start` binds and serves on the running event loop (uvicorn, no lifespan, no signal
    handlers of its own: the gRPC server's lifecycle drives both).
    """

    def __init__(self, backend: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"http_port={port!r} is out of range; allowed: 0 (ephemeral) to 65535")
        self.backend, self.host, self.requested_port = backend, host, port
        self.port: int | None = None
        self.app = create_app(self)
        self._server = None
        self._socket: socket.socket | None = None
        self._loop_task: asyncio.Task | None = None

    # what the handlers read from the server, looked up per request (the engine arrives late)
    @property
    def engine(self) -> Engine | None:
        return self.backend.engine

    @property
    def gate(self):
        return getattr(self.backend, "gate", None)

    @property
    def metrics(self):
        return getattr(self.backend, "metrics", None)

    @property
    def alerts(self):
        return getattr(self.backend, "alerts", None)

    @property
    def store(self):
        return getattr(self.backend, "store", None)

    @property
    def call_stats(self):
        rules = getattr(self.backend, "alert_rules", None)
        return rules.stats if rules is not None else None

    @property
    def ready(self) -> bool:
        return bool(getattr(self.backend, "ready", self.engine is not None))

    def check_key(self, header: str | None) -> None:
        auth = getattr(self.backend, "auth", None)
        if auth is not None:
            # The same check as gRPC metadata, its messages naming the header; an HTTP path is never
            # an "open" rpc.
            auth.check("/http", [(AUTH_METADATA_KEY, header)] if header is not None else [], http=True)

    def require_engine(self) -> Engine:
        engine = self.engine
        if engine is None:
            raise ModelsLoadingError("the server is still loading its models; retry shortly")
        return engine

    async def start(self) -> int:
        """Bind ``host:port`` and serve on the running loop; return the bound port."""
        try:
            sock = _listen(self.host, self.requested_port)
        except OSError as e:
            raise OSError(f"cannot bind HTTP {self.host}:{self.requested_port}: {e.strerror or e}") from None
        self._socket = sock
        self.port = sock.getsockname()[1]
        tls = getattr(self.backend, "tls", None)
        ssl_kwargs: dict[str, Any] = {}
        if tls is not None:
            ssl_kwargs = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
            if tls.client_ca_file is not None:
                ssl_kwargs.update(ssl_ca_certs=str(tls.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        # lifespan off and no uvicorn logging config: the process's logging is chatforge's;
        # the graceful-shutdown timeout is short because the drain gate already waited `grace`.
        # Idle keep-alive connections live 60 s (uvicorn's default, 5 s, makes a chat page or an
        # OpenAI client that pauses between turns reconnect for most requests).
        # GuardedHttpProtocol: uvicorn's httptools protocol (the C HTTP/1.1 parser, a dependency: a missing
        # one fails loudly at import instead of falling back to pure-Python h11 on the hot path) with a
        # deadline for request heads and a cap on connections.
        limit = getattr(self.backend, "max_message_bytes", None) or GRPC_DEFAULT_MAX_MESSAGE_BYTES
        config = uvicorn.Config(BodyLimit(self.app, limit), lifespan="off", log_config=None, access_log=False, http=GuardedHttpProtocol,
                                timeout_graceful_shutdown=1, timeout_keep_alive=60, server_header=False,
                                **ssl_kwargs)
        try:
            config.load()  # reads the TLS files: a bad one fails here, with the socket closed
            server = uvicorn.Server(config)
            server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._server = server
        # main_loop refreshes the Date header once a second and returns once should_exit is set.
        self._loop_task = asyncio.get_running_loop().create_task(server.main_loop())
        logger.info("http listening", extra={"address": f"{self.host}:{self.port}", "tls": tls is not None})
        return self.port

    async def stop(self) -> None:
        """Stop accepting and close connections (after the drain gate's grace): uvicorn cancels
        streams still open after its 1 s graceful-shutdown timeout, which drops their sequences."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.should_exit = True
        if self._loop_task is not None:
            await self._loop_task
        await server.shutdown(sockets=[self._socket] if self._socket is not None else None)
        logger.info("http stopped")

    # ----------------------------------------------------------------------------- handlers
    async def list_models(self, request: Request) -> Response:
        call = HttpCall(self, "/v1/models", request)
        try:
            call.admit(request.headers.get(AUTH_METADATA_KEY))
            engine = self.require_engine()
            body = ModelList(data=[_card(m) for m in engine.models()]).model_dump()
        except Exception as e:  # noqa: BLE001 - mapped to a status in one place
            return call.fail(e)
        call.finish(grpc.StatusCode.OK, 200)
        return JSONResponse(body, headers={REQUEST_ID_METADATA_KEY: call.request_id})

    async def get_model(self, request: Request, model: str) -> Response:
        call = HttpCall(self, "/v1/models/{model}", request)
        try:
            call.admit(request.headers.get(AUTH_METADATA_KEY))
            engine = self.require_engine()
            found = [m for m in engine.models() if m.name == model]
            if not found:
                raise ModelNotFoundError(f"no model named {model!r}; available: "
                                         f"{', '.join(sorted(m.name for m in engine.models()))}")
            body = _card(found[0]).model_dump()
        except Exception as e:  # noqa: BLE001
            return call.fail(e)
        call.finish(grpc.StatusCode.OK, 200)
        return JSONResponse(body, headers={REQUEST_ID_METADATA_KEY: call.request_id})

    async def _parsed(self, call: HttpCall, request: Request, parse: Callable[[bytes, str | None], Any]) -> Any:
        """The request's body, read and validated by ``parse`` once the call is admitted. Errors are FastAPI's:
        a body that fails validation is a :class:`FieldError` (400, as the app's RequestValidationError handler
        renders it); one that cannot be read or decoded raises the HTTPException FastAPI raises, with the call
        already finished."""
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone while sending its body: FastAPI's answer (nobody reads it)
            call.finish(grpc.StatusCode.CANCELLED, 499)
            raise StarletteHTTPException(status_code=400, detail=_BODY_PARSE_ERROR) from None
        try:
            return parse(raw, request.headers.get("content-type"))
        except RequestValidationError as e:
            param, message = _validation_message(list(e.errors()))
            raise FieldError(param, message) from None
        except StarletteHTTPException as e:
            call.finish(grpc.StatusCode.INVALID_ARGUMENT, 400)
            e.headers = {**(e.headers or {}), REQUEST_ID_METADATA_KEY: call.request_id}  # the id it was logged under
            raise

    async def classify(self, request: Request) -> Response:
        call = HttpCall(self, "/v1/classify", request)
        try:
            call.admit(request.headers.get(AUTH_METADATA_KEY))
            body: ClassifyHttpRequest = await self._parsed(call, request, parse_classify_request)
            engine = self.require_engine()
            name = body.model or engine.default_classifier or ""
            if name in engine.classifiers:
                call.info.set_model(name)
            work = engine.classify_with_model([body.text], body.model or None)
            remaining = call.remaining()
            try:
                [pred], hosted = await (work if remaining is None else asyncio.wait_for(work, max(remaining, 0)))
            except asyncio.TimeoutError:
                raise DeadlineExceededError("the X-Request-Timeout passed before the classification") from None
            out = ClassifyHttpResponse(label=pred.label, score=float(pred.score),
                                       scores={k: float(v) for k, v in pred.scores.items()},
                                       out_of_scope=bool(pred.out_of_scope), model=hosted.name,
                                       model_version=str(hosted.info.version), request_id=call.request_id)
        except StarletteHTTPException:  # FastAPI's answer to a body it cannot read (the call is finished)
            raise
        except Exception as e:  # noqa: BLE001
            return call.fail(e)
        self._record(call, model=out.model, model_version=out.model_version, user_text=body.text,
                     intent=out.label, intent_score=out.score)
        call.finish(grpc.StatusCode.OK, 200)
        return JSONResponse(out.model_dump(), headers={REQUEST_ID_METADATA_KEY: call.request_id})

    async def chat_completions(self, request: Request) -> Response:
        call = HttpCall(self, "/v1/chat/completions", request, params=CHAT_PARAMS)
        try:
            call.admit(request.headers.get(AUTH_METADATA_KEY))
            body: ChatCompletionRequest = await self._parsed(call, request, parse_chat_request)
            call.use_session(body.user)
            check_supported(body)
            engine = self.require_engine()
            index, text = last_user_message(body.messages)
            engine.check_text(text, field=f"messages[{index}].content")
            history = earlier_messages(body.messages, index, engine)
            options = generation_options(body, engine)
            stops = stop_sequences(body.stop)
            name = body.model or engine.default_generator or ""
            if name in engine.generators:
                call.info.set_model(name)
            turns = [t for role, t in history if role in CONTEXT_ROLES][-MAX_CONTEXT_TURNS:]
            started: list[ReplyDone] = []  # what the engine knows before the model's first token
            stream = engine.stream_reply(text, options, body.model or None, turns, on_start=started.append)
            if not body.stream:  # the whole reply, given up once the client is gone (as a stream is)
                reply = await _unless_gone(request, self._complete(
                    stream, call, lambda: _Reply(call, body, text, stops, engine, history, started)))
            else:
                # The first item is awaited here, before any byte is sent, so that everything the
                # engine refuses up front (validation, unknown model, overload) gets its HTTP status.
                # The client is watched meanwhile: a request still queued when it leaves is taken back.
                try:
                    first = await _unless_gone(request, self._next(stream, call))
                except BaseException:
                    await stream.aclose()
                    raise
        except StarletteHTTPException:  # FastAPI's answer to a body it cannot read (the call is finished)
            raise
        except ClientGoneError:  # the sequence is dropped; no one reads a response
            call.finish(grpc.StatusCode.CANCELLED, 499)
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001
            return call.fail(e)
        except asyncio.CancelledError:
            call.finish(grpc.StatusCode.CANCELLED, 499)
            raise
        if not body.stream:
            self._finish_reply(call, reply)
            return JSONResponse(reply.completion(), headers={REQUEST_ID_METADATA_KEY: call.request_id})
        reply = _Reply(call, body, text, stops, engine, history, started)
        return SseResponse(self._sse(call, reply, stream, first), {REQUEST_ID_METADATA_KEY: call.request_id})

    async def _complete(self, stream, call: HttpCall, new_reply: Callable[[], _Reply]) -> _Reply:
        """A non-streamed reply: every item of the engine's stream, taken up to the reply's end."""
        async with aclosing(stream):
            item = await self._next(stream, call)
            reply = new_reply()  # after the first item: what the engine said before it (on_start) is known
            while item is not None:
                done = reply.take(item)
                if is_whole_reply(item):
                    done = await self._take_end(stream, call, reply)
                if done:
                    break
                item = await self._next(stream, call)
        return reply

    async def _next(self, stream, call: HttpCall):
        """The stream's next item (None at its end), within the request's deadline."""
        remaining = call.remaining()
        try:
            if remaining is None:
                return await anext(stream, None)
            return await asyncio.wait_for(anext(stream, None), max(remaining, 0))
        except asyncio.TimeoutError:
            raise DeadlineExceededError("the X-Request-Timeout passed before the reply was complete") from None

    async def _take_end(self, stream, call: HttpCall, reply: _Reply) -> bool:
        """Take the :class:`ReplyDone` behind a whole reply (see :func:`is_whole_reply`); True (complete)."""
        end = await self._next(stream, call)
        return True if end is None else reply.take(end)

    async def _sse(self, call: HttpCall, reply: _Reply, stream, first):
        """The SSE body. Events that exist together go out in one write (``_events``): the role
        chunk with the first token, the last token with the finish/usage chunks and ``[DONE]``.
        Each write is a syscall here and a read plus a parse in the client, and a client sees its
        first token only after all writes before it (measured: about 1 ms of time to first token).
        The role chunk is made once the first item is taken, so every chunk names the same model."""
        code, status = grpc.StatusCode.CANCELLED, 499
        try:
            out: list[str] = []
            role = True
            async with aclosing(stream):
                item = first
                while item is not None:
                    done = reply.take(item)
                    if is_whole_reply(item):  # the model that answered is known only now
                        done = await self._take_end(stream, call, reply)
                    if role:
                        out.append(_dumps(reply.chunk({"role": "assistant", "content": ""})))
                        role = False
                    # One chunk per generated token, as over gRPC, also while its text is still
                    # empty (a SentencePiece token that only opens a word): clients see progress
                    # and time to first token means the same on both surfaces. With stop
                    # sequences, held-back text sends nothing until it is known to be safe.
                    if reply.pending or (isinstance(item, TokenDelta) and not reply.matcher.stops):
                        if done:
                            out.append(_dumps(reply.chunk({"content": reply.pending})))
                        else:  # the hot path: the chunk's constant parts are serialised once
                            yield (_events(out) + reply.content_event(reply.pending)) if out \
                                else reply.content_event(reply.pending)
                            out = []
                        reply.pending = ""
                    if done:
                        break
                    if out:
                        yield _events(out)
                        out = []
                    item = await self._next(stream, call)
            if role:  # a stream that ended without an item
                out.append(_dumps(reply.chunk({"role": "assistant", "content": ""})))
            out.append(_dumps(reply.chunk({}, reply.finish_reason)))
            if reply.body.stream_options is not None and reply.body.stream_options.include_usage:
                out.append(_dumps(reply.usage_chunk()))
            out.append("[DONE]")
            yield _events(out)
            code, status = grpc.StatusCode.OK, 200
            self._finish_reply(call, reply, finish=False)
        except Exception as e:  # noqa: BLE001 - after the headers: reported in the stream itself
            code, _ = grpc_code_of(e, call.request_id)
            status, err = error_body(e, call.request_id, call.params)
            if code is grpc.StatusCode.INTERNAL:
                logger.error("unhandled error in %s", call.rpc, exc_info=e,
                             extra={"rpc": call.rpc, "request_id": call.request_id})
                if self.alerts is not None:
                    self.alerts.alert_exception(e, rpc=call.rpc, context={"request_id": call.request_id})
            yield _events([_dumps(err), "[DONE]"])
        finally:
            # A client that went away lands here with CancelledError (SseResponse cancels the
            # response on http.disconnect); aclosing above has already dropped the sequence.
            call.finish(code, status)

    def _finish_reply(self, call: HttpCall, reply: _Reply, finish: bool = True) -> None:
        done = reply.facts
        if reply.done is None:  # a generated reply cut by a stop sequence: the model that started it answered
            call.info.answered(reply.model, reply.started.path if reply.started else "", "stop", False)
        self._record(call, model=reply.model, model_version=reply.version, user_text=reply.text,
                     reply=reply.content, intent=(done.intent or None) if done else None,
                     intent_score=done.intent_score if done and done.intent else None, ttft_ms=call.info.ttft_ms,
                     context=[{"role": r, "text": t} for r, t in reply.history] or None,
                     context_turns=done.context_turns if done else None, path=(done.path or None) if done else None)
        if finish:
            call.finish(grpc.StatusCode.OK, 200)

    def _record(self, call: HttpCall, **fields) -> None:
        store = self.store
        if store is None:
            return
        store.record(Turn(session_id=call.session_id, request_id=call.request_id, status="OK", traffic=call.traffic,
                          latency_ms=(time.perf_counter() - call.start) * 1000.0, **fields))

    async def healthz(self, request: Request) -> Response:
        if not getattr(self.backend, "live", True):
            return JSONResponse({"status": "not live"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        gate = self.gate
        ready = self.ready and self.engine is not None and not (gate is not None and gate.draining)
        return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket created with ``proto=IPPROTO_TCP``: asyncio turns Nagle off
    (TCP_NODELAY) only on connections of such sockets, and ``socket.create_server`` makes them with
    proto 0. With Nagle on, a response written as headers + body waited for the client's delayed
    ACK: 40 ms per request on loopback (measured: /healthz 48 ms, 0.7 ms with this)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def is_whole_reply(item) -> bool:
    """Whether ``item`` is a whole reply that no model generated token by token: the engine gives the pipeline's
    out-of-scope fallback, a policy's scripted or retrieved answer and a selection model's pick as one delta with
    a negative token id, and yields its :class:`ReplyDone` right behind it, with nothing to wait for. The
    surface takes both before it sends anything, so what the ReplyDone says (the model that answered, intent,
    out of scope, path, usage) is known to every chunk, and a stop sequence inside the reply does not lose it.
    A model's reply cut by a stop sequence ends without its ReplyDone (that would come only once the model ran
    to its end): it keeps what the surface knows (model, version, token counts)."""
    return isinstance(item, TokenDelta) and item.token_id < 0


class _Reply:
    """One completion as it is assembled: text after stop sequences, counts, the final record."""

    def __init__(self, call: HttpCall, body: ChatCompletionRequest, text: str, stops: list[str],
                 engine: Engine, history: list[tuple[str, str]] = (), started: list[ReplyDone] = ()) -> None:
        self.call, self.body, self.text, self.engine = call, body, text, engine
        self.history = list(history)
        self.matcher = StopMatcher(stops)
        self.parts: list[str] = []
        self.pending = ""
        self.tokens = 0
        self.done: ReplyDone | None = None
        self.stopped = False
        self.model = body.model or engine.default_generator or ""
        self.version = engine.version_of(self.model) or ""
        # The engine's facts from before the model's first token (Engine.stream_reply's on_start): a reply cut by
        # a stop sequence ends before its ReplyDone, and keeps these.
        self.started: ReplyDone | None = started[0] if started else None
        if self.started is not None:
            self.model, self.version = self.started.model, self.started.version
        self.id = f"chatcmpl-{call.request_id}"
        self.created = int(time.time())
        self._event_model: str | None = None
        self._event_head = ""

    def take(self, item) -> bool:
        """Consume one engine item; True when the reply is complete (end, or a stop sequence). After a stop
        sequence only a ReplyDone is taken (it completes the reply's facts; the text stays cut)."""
        if isinstance(item, TokenDelta):
            if self.stopped:
                return True
            self.call.info.token()
            self.tokens += 1
            out, hit = self.matcher.feed(item.text)
            self.parts.append(out)
            self.pending += out
            if hit:
                self.stopped = True
                return True
            return False
        assert isinstance(item, ReplyDone)
        self.done = item
        self.model, self.version = item.model, item.version
        self.call.info.answered(item.model, item.path, item.finish_reason, item.out_of_scope)
        tail = self.matcher.flush()
        self.parts.append(tail)
        self.pending += tail
        return True

    @property
    def content(self) -> str:
        return "".join(self.parts)

    @property
    def finish_reason(self) -> str:
        if self.stopped or self.done is None or self.done.finish_reason != "length":
            return "stop"  # "stop": </s>, a stop sequence, or the pipeline's fallback reply
        return "length"

    @property
    def facts(self) -> ReplyDone | None:
        """The reply's ReplyDone, or for a reply cut by a stop sequence what the engine said before it started."""
        return self.done if self.done is not None else self.started

    def usage(self) -> dict[str, int]:
        if self.done is not None:
            prompt, completion = self.done.prompt_tokens, self.done.completion_tokens
        elif self.started is not None:  # cut by a stop sequence: the counts as the engine had them, and ours
            prompt, completion = self.started.prompt_tokens, self.tokens
        else:
            prompt = self.engine.generators[self.model].count_tokens(self.text) if self.model in \
                self.engine.generators else 0
            completion = self.tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def extension(self) -> dict[str, Any]:
        facts = self.facts
        return ChatforgeInfo(model_version=self.version, request_id=self.call.request_id,
                             intent=(facts.intent or None) if facts else None,
                             intent_score=facts.intent_score if facts and facts.intent else None,
                             out_of_scope=bool(self.done and self.done.out_of_scope),
                             context_turns=facts.context_turns if facts else 0,
                             path=(facts.path or None) if facts else None).model_dump()

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        if finish_reason is not None:
            out["chatforge"] = self.extension()
        return out

    def content_event(self, text: str) -> bytes:
        """``_events([_dumps(self.chunk({"content": text}))])``, byte for byte, with the parts that are
        the same for every token of this reply serialised once (per model: it is known by then)."""
        if self._event_model != self.model:
            head = _dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model})
            self._event_head = f'data: {head[:-1]},"choices":[{{"index":0,"delta":{{"content":'
            self._event_model = self.model
        return f'{self._event_head}{_dumps(text)}}},"finish_reason":null,"logprobs":null}}]}}\n\n'.encode()

    def usage_chunk(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    def completion(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.content},
                             "finish_reason": self.finish_reason, "logprobs": None}],
                "usage": self.usage(), "system_fingerprint": None, "chatforge": self.extension()}


def _card(m) -> ModelCard:
    created = m.info.metadata.get("created") if isinstance(m.info.metadata, dict) else None
    return ModelCard(id=m.name, created=_epoch(created), owned_by="chatforge", task=m.info.task,
                     family=m.info.family, version=str(m.info.version), is_default=m.is_default,
                     context_turns=_context_turns(m.info.metadata))


def _context_turns(metadata: Any) -> int:
    """The generator's ``context_turns`` (``Seq2SeqGenerator`` puts it in its metadata); 0 when absent."""
    value = metadata.get("context_turns") if isinstance(metadata, dict) else None
    return int(value) if isinstance(value, str) and value.isdigit() else 0


def _epoch(value: Any) -> int:
    """A bundle's creation time (ISO 8601 in metadata.json) as Unix seconds; 0 when unknown."""
    if isinstance(value, str):
        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return 0
    return 0


# ------------------------------------------------------------------------------------- the app
def _static(name: str) -> bytes:
    return resources.files("chatforge.serving").joinpath("static", name).read_bytes()


_STATIC_TYPES = {"index.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
                 "chat.css": "text/css; charset=utf-8"}
# Everything the page loads comes from this server: no CDN, no inline script.
_PAGE_HEADERS = {"content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                 "x-content-type-options": "nosniff", "cache-control": "no-cache"}


def create_app(surface: HttpSurface) -> FastAPI:
    app = FastAPI(title="chatforge", version=_version(), docs_url=None, redoc_url=None,
                  description="OpenAI-compatible chat completions, intent classification and health of a "
                              "chatforge server. Errors use the OpenAI error object.")
    headers_doc = {"X-Request-Id": {"description": "The request id (also in logs)", "schema": {"type": "string"}}}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = _validation_message(list(exc.errors()))
        request_id = pick_request_id([(REQUEST_ID_METADATA_KEY, request.headers.get(REQUEST_ID_METADATA_KEY))])
        return error_response(FieldError(param, message), request_id)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail, headers = exc.detail, getattr(exc, "headers", None)
        param = None
        if exc.status_code == 400 and detail == _BODY_PARSE_ERROR:  # FastAPI's words for a body it cannot decode
            detail, param = _BODY_NOT_UTF8, "body"
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route on the path only (GET of /v1/models, whose HEAD
            # is a route of its own), and its message none
            allowed = _allowed_methods(app, request.scope)
            detail = f"method not allowed; allowed: {allowed}"
            headers = {**{k: v for k, v in (headers or {}).items() if k.lower() != "allow"}, "allow": allowed}
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {detail}",
                                       "type": kind, "param": param, "code": str(exc.status_code)}},
                            status_code=exc.status_code, headers=headers)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"],
             responses={k: _ERRORS[k] for k in (401, 503)}, summary="The served models and versions")
    async def list_models(request: Request):
        return await surface.list_models(request)

    @app.get("/v1/models/{model}", response_model=ModelCard, tags=["openai"],
             responses={k: _ERRORS[k] for k in (401, 404, 503)}, summary="One served model")
    async def get_model(request: Request, model: str):
        return await surface.get_model(request, model)

    # The routes with a body, served lean (see parse_body); ``doc`` documents them with the request
    # model FastAPI would have validated, so /openapi.json is what it was.
    doc = APIRouter()

    @doc.post("/v1/chat/completions", tags=["openai"], response_model=None, summary="A chat completion",
              responses={200: {"model": ChatCompletion, "headers": headers_doc,
                               "content": {"text/event-stream": {"schema": {"type": "string"}}},
                               "description": "`stream: false`: a chat.completion object. " + _SSE_DOC},
                         **{k: _ERRORS[k] for k in (400, 401, 404, 413, 429, 503, 504)}})
    async def chat_completions(request: Request, body: ChatCompletionRequest):  # pragma: no cover
        raise NotImplementedError("documentation only; served by surface.chat_completions")

    @doc.post("/v1/classify", response_model=ClassifyHttpResponse, tags=["chatforge"],
              responses={k: _ERRORS[k] for k in (400, 401, 404, 413, 429, 503, 504)},
              summary="Intent, score, all scores and out-of-scope of one message")
    async def classify(request: Request, body: ClassifyHttpRequest):  # pragma: no cover
        raise NotImplementedError("documentation only; served by surface.classify")

    # Served by plain routes whose handlers check the API key before they parse the body (HttpSurface._parsed).
    lean_routes = [Route("/v1/chat/completions", surface.chat_completions, methods=["POST"]),
                   Route("/v1/classify", surface.classify, methods=["POST"])]
    app.router.routes.extend(lean_routes)
    documented = {r.path: r for r in doc.routes}

    @app.get("/healthz", response_model=HealthStatus, tags=["health"], summary="Liveness: 200 while up")
    async def healthz(request: Request):
        return await surface.healthz(request)

    @app.get("/readyz", response_model=HealthStatus, tags=["health"],
             responses={503: {"model": HealthStatus, "description": "Loading or draining"}},
             summary="Readiness: 200 when models are loaded and not draining")
    async def readyz(request: Request):
        return await surface.readyz(request)

    def page(name: str):
        async def serve_file() -> Response:
            return Response(_static(name), media_type=_STATIC_TYPES[name], headers=_PAGE_HEADERS)
        return serve_file

    app.add_api_route("/", page("index.html"), methods=["GET", "HEAD"], include_in_schema=False)
    for name in ("chat.js", "chat.css"):
        app.add_api_route(f"/static/{name}", page(name), methods=["GET", "HEAD"], include_in_schema=False)
    # HEAD of the probes (RFC 9110: a server that has GET has HEAD; uptime checkers and `curl -I` use it);
    # kept out of /openapi.json, which documents the GETs. The server sends the headers without the body.
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/v1/models", list_models, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/v1/models/{model}", get_model, methods=["HEAD"], include_in_schema=False)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            routes = [documented[r.path] if r in lean_routes else r for r in app.routes]
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=routes)
            # Validation errors are 400 with the OpenAI error object (see _invalid), never 422.
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
                    if op.get("requestBody") and "400" not in op.get("responses", {}):
                        op["responses"]["400"] = {"description": _ERRORS[400]["description"], "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            comps = schema.get("components", {}).get("schemas", {})
            comps.pop("HTTPValidationError", None)
            comps.pop("ValidationError", None)
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _allowed_methods(app: FastAPI, scope: dict[str, Any]) -> str:
    """The methods the routes on ``scope``'s path serve, as an ``Allow`` header lists them."""
    methods: set[str] = set()
    for route in app.router.routes:
        if getattr(route, "methods", None) and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def _version() -> str:
    try:
        return importlib.metadata.version("chatforge")
    except Exception:  # noqa: BLE001 - not installed (running from a source tree)
        return "0"

