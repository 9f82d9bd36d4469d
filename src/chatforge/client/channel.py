"""ChatbotClient: a blocking client for the chatforge.v1.Chatbot service.

One client owns one channel, reused by every call (use it as a context manager, or call
``close()``). The channel carries keepalive settings matched to the server's and a service
config with retries, retry throttling and per-method timeouts; given several addresses
(``"ipv4:127.0.0.1:5001,127.0.0.1:5002"``) it balances calls ``round_robin`` and, with
client-side health checking, skips replicas whose readiness is NOT_SERVING.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatforge.context import (
    MAX_SESSION_ID_CHARS,
    REQUEST_ID_CHARS,
    REQUEST_ID_METADATA_KEY,
    SESSION_ID_METADATA_KEY,
    is_valid_request_id,
    new_request_id,
    request_id_var,
    session_id_var,
)
from chatforge.predictions import ClassPrediction  # not chatforge.inference: that imports torch
from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

READINESS_SERVICE = "chatforge.v1.Chatbot"

# UNAVAILABLE: a replica is down, draining or still loading -> another attempt (another
# replica under round_robin); safe because the server commits nothing before answering.
# RESOURCE_EXHAUSTED is not here: gRPC uses it both for a replica whose queue is full (worth another attempt after a
# backoff) and for a request over the server's message size limit (never: the same bytes fail again, and a 100 KB
# request was uploaded 5 times, each failure also spending retry-throttle tokens). The channel cannot tell the two
# apart; the client can (see _should_retry): only a chatforge server's own answer carries its trailers.
_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

# Per-method deadlines when the caller gives none (a Reply stream may run long on CPU).
METHOD_TIMEOUTS = {"Reply": "120s", "Classify": "10s", "ListModels": "5s"}

# Application-level retries, on top of the service config's. gRPC's own retry ends once an attempt
# is committed (sent on a connection): a replica that dies with the call in flight fails it with
# UNAVAILABLE "Stream removed" / "Socket closed", and retry throttling stops retries while many
# calls fail at once (exactly when a replica dies). Classify and ListModels are idempotent, and a
# Reply that has not sent a token has produced nothing, so those are sent again (round_robin picks
# another replica), at most CALL_ATTEMPTS times in all, with jittered backoff, within the deadline;
# only when the connection failed or the server's process dropped the call, not for an UNAVAILABLE the server
# answered (see _should_retry).
CALL_ATTEMPTS = 4
# What a call that the server's process dropped looks like (no chatforge trailers: no handler answered it).
# UNAVAILABLE: the connection broke or never opened. CANCELLED: the server stopped with the call accepted but not
# answered: a replica ending its drain cancels what arrived in its last moments on a connection a TCP-mode balancer
# still pinned to it (seen behind HAProxy in tcp mode). chatforge's server never answers CANCELLED itself, and this
# client never cancels a call it then retries (an abandoned stream is not retried), so that CANCELLED is the server's.
_DROPPED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
RETRY_BACKOFF_S = (0.05, 0.5)  # first backoff, cap (doubling, full jitter)
# Before a call is sent again, wait up to this long (and at most half the time its deadline leaves) for the channel
# to be READY. A dropped connection leaves the channel in TRANSIENT_FAILURE for gRPC's reconnect backoff (1 s, +-20 %),
# where every call fails at once ("failed to connect to all addresses"), so re-sends after the short backoffs above
# would all fail inside that window (seen behind HAProxy in tcp mode when a replica was killed: 4 of 1,200 calls).
RECONNECT_WAIT_S = 1.0


def service_config(*, round_robin: bool = False, health_check: bool = False) -> str:
    """The channel's service config (JSON).

    Retries cover every Chatbot method (Reply included) and health Check. For the
    server-streaming Reply this is safe: gRPC commits an attempt as soon as response
    headers or a message arrive and never retries after that, so a retry can only happen
    before the first token, and a reply is never duplicated or spliced. (The server sends
    its headers with the first message, so errors before it stay retryable.)
    ``retryThrottling`` stops retries when most calls fail (a retry storm would only add
    load to a struggling fleet): each failure costs a token, each success returns 0.1.
    """
    methods = [
        {"name": [{"service": "chatforge.v1.Chatbot", "method": m}], "timeout": t, "retryPolicy": _RETRY_POLICY}
        for m, t in METHOD_TIMEOUTS.items()
    ]
    methods.append({"name": [{"service": "grpc.health.v1.Health", "method": "Check"}], "timeout": "5s",
                    "retryPolicy": _RETRY_POLICY})
    config: dict = {"methodConfig": methods, "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}}
    if round_robin or health_check:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if health_check:
        # grpc-core watches grpc.health.v1.Health/Watch on every subchannel and routes only to
        # replicas whose readiness is SERVING (tests/client/test_balancing.py proves it).
        config["healthCheckConfig"] = {"serviceName": READINESS_SERVICE}
    return json.dumps(config)


SERVICE_CONFIG = service_config()

# Keepalive, consistent with chatforge.serving.server: ping every 30 s (the server
# accepts pings down to every 10 s, so no GOAWAY "too_many_pings"), give up on the
# connection after 10 s without an answer, and keep pinging while idle so a dead
# connection (a balancer or NAT that silently dropped it) is noticed before the next
# call rather than by it. The idle timeout is raised from grpc's 30 minutes: an idle
# channel that disconnects makes the next call pay a reconnect.
CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.client_idle_timeout_ms", 24 * 3600 * 1000),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    # grpc Python's single-threaded unary-stream path: the thread that iterates a Reply stream
    # drives it, instead of a channel thread that hands each message over through a condition
    # variable. One thread wake-up less per message: ~0.07 ms less time to first token against a
    # bare echo server here (grpc/grpc#20753 measured ~6.5% lower latency). Python-layer only,
    # never sent to grpc core; the iterator keeps cancel(), code() and the metadata getters.
    ("SingleThreadedUnaryStream", 1),
)


def _answered_by_server(e: grpc.RpcError) -> bool:
    """Whether a chatforge server sent this status (its trailers always carry the request id);
    False for a connection that broke or never opened ("Stream removed", "Socket closed")."""
    try:
        trailers = e.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - no trailers on an error raised before the call
        return False
    return any(k == REQUEST_ID_METADATA_KEY for k, _ in trailers)


def _checked_request_id(request_id: str | None) -> str | None:
    """A caller's request id, if the server will keep it: the server replaces any other with its own (so the
    caller's log lines and the server's would name different ids), and gRPC fails a call whose header value is
    not printable ASCII with a bare INTERNAL "Invalid metadata"."""
    if request_id and not is_valid_request_id(request_id):
        raise ValueError(f"request_id={request_id!r} is invalid; allowed: {REQUEST_ID_CHARS}")
    return request_id


def _is_multi_address(target: str) -> bool:
    return "," in target


def client_credentials(ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                       key_file: str | Path | None = None):
    """Channel credentials: trust ``ca_file`` (system roots if None); a cert+key for mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("mutual TLS needs both a client certificate and its key (or neither)")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


class ChatbotError(Exception):
    """A failed call: the gRPC status ``code`` (grpc.StatusCode), ``details`` and ``request_id``."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None) -> None:
        self.code = code
        self.details = details
        self.request_id = request_id
        # The server's INTERNAL details already name the id ("internal error (request id X)"): say it once.
        rid = f" [request id {request_id}]" if request_id and request_id not in details else ""
        super().__init__(f"{code.name}: {details}{rid}")


@dataclass
class ReplyChunk:
    """One item of :meth:`ChatbotClient.reply_stream`.

    A token chunk has ``text`` and ``token_id``; the last chunk has ``finish_reason``
    ("stop", "length", ...), the token counts, the model and the request id.
    """

    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    request_id: str = ""
    model_version: str = ""
    intent: str = ""
    intent_score: float = 0.0
    path: str = ""  # reply policy: which path answered
    path_score: float = 0.0
    context_turns: int = 0  # earlier turns of ``context`` the model read
    out_of_scope: bool = False  # a classifier judged the message out of scope (the fallback reply answered)

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ModelEntry:
    """A model the server hosts (see ListModels)."""

    name: str
    family: str
    task: str
    version: str
    metadata: dict[str, str] = field(default_factory=dict)
    is_default: bool = False


_GENERATION_OPTIONS = {f.name for f in pb.GenerationOptions.DESCRIPTOR.fields}


class ChatbotClient:
    """Blocking client owning one gRPC channel to ``target``.

    ``target`` is "host:port", or several addresses ("ipv4:127.0.0.1:5001,127.0.0.1:5002"),
    balanced round_robin with client-side health checking (``health_check``, on by default
    for several addresses). ``timeout`` is the per-call deadline in seconds (for Reply: the
    whole stream; None = the per-method defaults of the service config). ``metadata`` is
    sent with every call. ``request_id`` fixes the ``x-request-id`` of every call; otherwise
    each call gets a new one unless the method is given ``request_id=``. ``api_key`` is sent
    as ``authorization: Bearer``. ``tls`` (or any of ``ca_file``/``cert_file``/``key_file``)
    uses a TLS channel; ``cert_file`` + ``key_file`` for mutual TLS. ``options`` are extra
    channel options that override the defaults.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        metadata: Sequence[tuple[str, str]] | None = None,
        request_id: str | None = None,
        options: Sequence[tuple[str, object]] | None = None,
        health_check: bool | None = None,
        api_key: str | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
    ) -> None:
        if not target or not isinstance(target, str):
            raise ValueError(f"target={target!r} is invalid; allowed: 'host:port', e.g. '127.0.0.1:50051'")
        if timeout is not None and not 0 < timeout < math.inf:  # inf and NaN failed every call DEADLINE_EXCEEDED
            raise ValueError(f"timeout={timeout!r} is out of range; allowed: a finite number of seconds > 0, or None "
                             "(the per-method defaults)")
        self.target = target
        self.timeout = timeout
        md = list(metadata or ())
        if api_key is not None:
            if not api_key.strip():
                raise ValueError("api_key is empty; allowed: a non-empty key or None")
            md.append(("authorization", f"Bearer {api_key.strip()}"))
        self._metadata = tuple(md)
        self._request_id = _checked_request_id(request_id)
        self.last_request_id: str | None = None
        multi = _is_multi_address(target)
        self.health_check = multi if health_check is None else health_check
        config = service_config(round_robin=multi, health_check=self.health_check)
        # User options override ours; deduplicated, as grpc does not promise which duplicate wins.
        merged = dict(CHANNEL_OPTIONS)
        merged["grpc.service_config"] = config
        merged.update(dict(options or ()))
        channel_options = list(merged.items())
        if tls or ca_file or cert_file or key_file:
            creds = client_credentials(ca_file, cert_file, key_file)
            self._channel = grpc.secure_channel(target, creds, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self._stub = pb_grpc.ChatbotStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._closed = False

    def __repr__(self) -> str:  # no metadata: it may hold the API key
        return f"ChatbotClient({self.target!r})"

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the channel (idempotent); calls in flight are cancelled."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> ChatbotClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_for_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected; raise ChatbotError(UNAVAILABLE) after ``timeout`` s."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ChatbotError(
                grpc.StatusCode.UNAVAILABLE, f"could not connect to {self.target} within {timeout} s"
            ) from None

    # ------------------------------------------------------------------ helpers

    def _call_metadata(self, request_id: str | None, session_id: str | None = None, rpc: str = ""):
        rid = _checked_request_id(request_id) or self._request_id or new_request_id()
        md = [*self._metadata, (REQUEST_ID_METADATA_KEY, rid)]
        # The header is a copy for proxies and logs; ReplyRequest.session_id carries the id itself. gRPC
        # refuses a header value outside printable ASCII (the whole call fails INTERNAL), so an id such as
        # "사용자-1" travels in the field only; so does an over-long id, which the server then refuses naming the
        # field the caller set (the header is checked first, and its error would name a header the caller never saw).
        if (session_id and session_id.isascii() and session_id.isprintable()
                and len(session_id) <= MAX_SESSION_ID_CHARS):
            md.append((SESSION_ID_METADATA_KEY, session_id))
        self._log(rid, logging.DEBUG, "calling %s on %s", rpc, self.target, rpc=rpc, session_id=session_id)
        return rid, tuple(md)

    def _log(self, rid: str, level: int, msg: str, *args, session_id: str | None = None, **extra) -> None:
        # The ids in the contextvars as well as in `extra`: JSON logs read them from the contextvars,
        # so the client's line matches the API's and the engine's lines for the same call (request id
        # and, for a Reply that names one, session id).
        tokens = (request_id_var.set(rid), session_id_var.set(session_id or None))
        try:
            logger.log(level, msg, *args, extra={"request_id": rid, "session_id": session_id or None, **extra})
        finally:
            session_id_var.reset(tokens[1])
            request_id_var.reset(tokens[0])

    def _remember(self, call, sent_id: str) -> str:
        """The server's request id: in the headers of a response, in the trailers of any call."""
        rid = sent_id
        for getter in ("trailing_metadata", "initial_metadata"):
            try:
                metadata = getattr(call, getter)() or ()
            except Exception:  # noqa: BLE001 - e.g. no metadata on a call that never reached the server
                continue
            found = [v for k, v in metadata if k == REQUEST_ID_METADATA_KEY]
            if found:
                rid = found[-1]
                break
        self.last_request_id = rid
        return rid

    def _error(self, e: grpc.RpcError, sent_id: str, session_id: str | None = None) -> ChatbotError:
        rid = self._remember(e, sent_id)
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        self._log(rid, logging.DEBUG, "call failed: %s", code.name, grpc_code=code.name, session_id=session_id)
        return ChatbotError(code, details or "", rid)

    def _unary(self, method, request, request_id: str | None, rpc: str, *, idempotent: bool = False):
        rid, md = self._call_metadata(request_id, rpc=rpc)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        attempt = 1
        while True:
            try:
                response, call = method.with_call(request, timeout=self._time_left(deadline), metadata=md)
            except grpc.RpcError as e:
                if idempotent and self._should_retry(e, attempt, deadline, rid, rpc):
                    attempt += 1
                    continue
                raise self._error(e, rid) from None
            self._remember(call, rid)
            return response

    @staticmethod
    def _time_left(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.001, deadline - time.monotonic())

    def _should_retry(self, e: grpc.RpcError, attempt: int, deadline: float | None, rid: str, rpc: str,
                      session_id: str | None = None) -> bool:
        """True (after a backoff) if a call that failed with ``e`` may be sent again."""
        code = e.code() if hasattr(e, "code") else None
        answered = _answered_by_server(e)
        # A full queue, said by the server itself (its trailers): another attempt after a backoff. RESOURCE_EXHAUSTED
        # without them is gRPC's own (a message over the size limit), which would fail the same way again.
        overloaded = code == grpc.StatusCode.RESOURCE_EXHAUSTED and answered
        if (code not in _DROPPED_CODES and not overloaded) or attempt >= CALL_ATTEMPTS or self._closed:
            return False
        if answered and not overloaded:
            # An UNAVAILABLE the server sent (draining, still loading) was already retried by the
            # channel's retry policy; sending it again here would only multiply the attempts.
            return False
        backoff = random.uniform(0, min(RETRY_BACKOFF_S[1], RETRY_BACKOFF_S[0] * 2 ** (attempt - 1)))
        if deadline is not None and time.monotonic() + backoff >= deadline:
            return False  # no time left for another attempt: the caller's deadline wins
        self._log(rid, logging.INFO, "%s failed with %s (%s); retrying, attempt %d of %d", rpc, code.name,
                  e.details() if hasattr(e, "details") else "", attempt + 1, CALL_ATTEMPTS, rpc=rpc,
                  session_id=session_id)
        time.sleep(backoff)  # backoff between attempts, not synchronisation
        if not overloaded:  # the connection is up when the server itself answered
            self._await_channel(deadline)
        return True

    def _await_channel(self, deadline: float | None) -> None:
        """Wait (bounded: RECONNECT_WAIT_S, half the time left) for the channel to be READY before a re-send, so
        the attempt is not failed at once by a channel still waiting out its reconnect backoff. The wait is a health
        Check with wait_for_ready (any answer, UNIMPLEMENTED included, means a connection is up); unlike
        grpc.channel_ready_future it starts no connectivity-polling thread that outlives the call. A channel that
        does not come back in time is tried anyway: that attempt fails as the caller would have seen it."""
        wait = RECONNECT_WAIT_S if deadline is None else min(RECONNECT_WAIT_S, (deadline - time.monotonic()) / 2)
        if wait <= 0.01:
            return
        try:
            self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=wait, wait_for_ready=True)
        except grpc.RpcError:
            pass

    # ------------------------------------------------------------------ API

    def reply_stream(
        self,
        text: str,
        *,
        model: str | None = None,
        session_id: str | None = None,
        request_id: str | None = None,
        context: Sequence[tuple[str, str]] = (),
        **generation_options,
    ) -> Iterator[ReplyChunk]:
        """Stream a reply: one :class:`ReplyChunk` per token, then a final one.

        ``context`` is the conversation's earlier turns, oldest first, as (role, text) with role "user"
        or "assistant"; a model trained with context reads the latest ones (the final chunk's
        ``context_turns`` says how many), and the server stores them with the turn.

        ``generation_options`` are the fields of ``chatforge.v1.GenerationOptions``
        (max_new_tokens, temperature, ...); unset ones take the server's defaults.
        Closing the iterator early (``break`` + ``close()``, or garbage collection)
        cancels the call, which stops the model on the server.
        """
        unknown = set(generation_options) - _GENERATION_OPTIONS
        if unknown:
            raise TypeError(
                f"unknown generation option(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(_GENERATION_OPTIONS))}"
            )
        opts = {k: v for k, v in generation_options.items() if v is not None}
        request = pb.ReplyRequest(
            text=text, model=model or "", session_id=session_id or "", options=pb.GenerationOptions(**opts),
            context=[pb.ContextTurn(role=role, text=turn) for role, turn in context],
        )
        rid, md = self._call_metadata(request_id, session_id, rpc="/chatforge.v1.Chatbot/Reply")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        attempt = 1
        while True:
            call = self._stub.Reply(request, timeout=self._time_left(deadline), metadata=md)
            received = False
            try:
                for chunk in self._chunks(call):
                    received = True
                    yield chunk
                self._remember(call, rid)
                return
            except grpc.RpcError as e:
                # Retried only while nothing reached the caller: a reply is never duplicated or spliced.
                if not received and self._should_retry(e, attempt, deadline, rid, "/chatforge.v1.Chatbot/Reply",
                                                        session_id):
                    attempt += 1
                    continue
                raise self._error(e, rid, session_id) from None
            finally:
                # A no-op when the call finished; otherwise the consumer left early: tell the server.
                call.cancel()

    @staticmethod
    def _chunks(call) -> Iterator[ReplyChunk]:
        for msg in call:
            if msg.HasField("delta"):
                yield ReplyChunk(text=msg.delta.text, token_id=msg.delta.token_id)
            else:
                f = msg.final
                yield ReplyChunk(
                    finish_reason=f.finish_reason,
                    prompt_tokens=f.prompt_tokens,
                    completion_tokens=f.completion_tokens,
                    model=f.model,
                    request_id=f.request_id,
                    model_version=f.model_version,
                    intent=f.intent,
                    intent_score=round(f.intent_score, 6),
                    path=f.path,
                    path_score=round(f.path_score, 6),
                    context_turns=f.context_turns,
                    out_of_scope=f.out_of_scope,
                )

    def reply(self, text: str, **kwargs) -> str:
        """The whole reply as one string (see :meth:`reply_stream` for the arguments)."""
        return "".join(c.text for c in self.reply_stream(text, **kwargs) if not c.is_final)

    def classify(self, text: str, model: str | None = None, *, request_id: str | None = None) -> ClassPrediction:
        r = self._unary(self._stub.Classify, pb.ClassifyRequest(text=text, model=model or ""), request_id,
                        "/chatforge.v1.Chatbot/Classify", idempotent=True)
        # Scores travel as float32: round off the float32 -> float64 noise (0.8 -> 0.800000011920929).
        return ClassPrediction(
            label=r.label,
            score=round(r.score, 6),
            scores={k: round(v, 6) for k, v in r.scores.items()},
            out_of_scope=r.out_of_scope,
        )

    def list_models(self, *, request_id: str | None = None) -> list[ModelEntry]:
        r = self._unary(self._stub.ListModels, pb.ListModelsRequest(), request_id, "/chatforge.v1.Chatbot/ListModels",
                        idempotent=True)
        return [
            ModelEntry(m.name, m.family, m.task, m.version, dict(m.metadata), m.is_default) for m in r.models
        ]

    def health(self, service: str = "", *, request_id: str | None = None) -> str:
        """The server's health status for ``service`` ("" = the whole server): "SERVING", "NOT_SERVING", ..."""
        r = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), request_id,
                        "/grpc.health.v1.Health/Check")
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
