"""A small blocking client of chatforge's HTTP surface, for ``chatforge loadtest --protocol http``
and benchmarks/http_vs_grpc.py: the same calls as :class:`~chatforge.client.channel.ChatbotClient`
(``reply_stream``, ``classify``, ``health``) over the OpenAI-compatible endpoints, so both surfaces
are measured the same way. Streams parse the SSE ``data:`` lines as any OpenAI client does.
Built on httpx; imports no torch and no grpc.

Like ChatbotClient, a call whose connection failed unanswered (refused, reset, closed by a balancer
or a draining server as the request went out, or cut by a replica that died while writing its answer)
is sent again, at most ``CALL_ATTEMPTS`` times in all: ``classify`` (idempotent) until its whole answer
arrived, ``reply_stream`` only before its first token; never after an error status, never after a
token reached the caller.
"""

from __future__ import annotations

import json
import logging
import math
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import httpx

from chatforge.context import REQUEST_ID_METADATA_KEY, new_request_id

logger = logging.getLogger(__name__)

# The same bounds as chatforge.client.channel's CALL_ATTEMPTS and RETRY_BACKOFF_S (duplicated: that
# module imports grpc; tests/client/test_http_retry.py checks they agree).
CALL_ATTEMPTS = 4
RETRY_BACKOFF_S = (0.05, 0.5)  # first backoff, cap (doubling, full jitter)
# Failures of the connection, where no answer will come: it was refused or reset, a write failed, the server
# closed it without a byte ("Server disconnected without sending a response", also what a pooled keep-alive
# connection closed under the request looks like), or closed it in the middle of an answer (a replica killed
# while writing). Timeouts are not among them: after a read timeout the server may still be working on it.
_DROPPED = (httpx.NetworkError, httpx.RemoteProtocolError)


class HttpChatError(Exception):
    """A failed HTTP call: the HTTP ``status``, the OpenAI error ``code`` and ``message``."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        self.status, self.message, self.code = status, message, code
        super().__init__(f"HTTP {status} ({code or 'error'}): {message}")

    @property
    def status_name(self) -> str:
        """The status as a load-test report counts it, e.g. ``HTTP_429``."""
        return f"HTTP_{self.status}"


class HttpStreamError(HttpChatError):
    """A 200 whose body is no whole chat completion stream: not SSE, an event that is not JSON, or cut before
    ``data: [DONE]``. A load test counts it as ``BAD_STREAM``, not as an HTTP status."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(200, message, code)

    @property
    def status_name(self) -> str:
        return "BAD_STREAM"


@dataclass
class HttpChunk:
    """One token of a streamed reply, or (``is_final``) its end with the finish reason and usage."""

    text: str = ""
    is_final: bool = False
    finish_reason: str | None = None
    completion_tokens: int | None = None


def _is_chunk(event: dict[str, Any]) -> bool:
    """Whether the fields reply_stream reads have a chat completion chunk's types: ``choices`` a list of objects whose
    ``delta`` is an object with text (or null) ``content``, ``usage`` an object."""
    usage, choices = event.get("usage"), event.get("choices")
    if usage is not None and not isinstance(usage, dict):
        return False
    if choices is None:
        return True
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            return False
        delta = choice.get("delta")
        if delta is not None and not (isinstance(delta, dict) and isinstance(delta.get("content", ""), str | None)):
            return False
    return True


class HttpChatClient:
    """Blocking calls to ``http://HOST:PORT`` (one pooled httpx client; thread-safe)."""

    def __init__(self, target: str, *, timeout: float = 30.0, api_key: str | None = None,
                 scheme: str = "http", headers: dict[str, str] | None = None) -> None:
        if ":" not in target:
            raise ValueError(f"target={target!r} is invalid; allowed: HOST:PORT, e.g. 127.0.0.1:8080")
        if not 0 < timeout < math.inf:  # 0 failed each call as "HTTP 503 (unavailable)" from a healthy server
            raise ValueError(f"timeout={timeout!r} is out of range; allowed: a finite number of seconds > 0")
        headers = {**(headers or {}), **({"Authorization": f"Bearer {api_key}"} if api_key else {})}  # sent every call
        self.base_url = f"{scheme}://{target}"
        # TCP_NODELAY as curl sets it: httpx writes a request's headers and body separately, and
        # with Nagle the body could wait for the server's delayed ACK.
        transport = httpx.HTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)
        self._closed = threading.Event()

    def __enter__(self) -> HttpChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()  # first: a call waiting to be sent again gives up
        self._http.close()

    def _send(self, path: str, body: dict[str, Any], request_id: str) -> httpx.Response:
        """POST ``body`` and return the response once its status and headers arrived (body unread: close it).
        Every attempt of one call carries the call's ``request_id`` (X-Request-Id), as ChatbotClient's do: the
        server's conversation store keeps a call sent again as one turn, and the logs show the attempts as one."""
        request = self._http.build_request("POST", path, json=body, headers={REQUEST_ID_METADATA_KEY: request_id})
        return self._http.send(request, stream=True)

    def _next_attempt(self, e: Exception, attempt: int, path: str) -> int:
        """The next attempt's number after a call failed unanswered with ``e`` (see ``_DROPPED``), after a
        backoff; past the last attempt (or after close()), HttpChatError 503 "unavailable" from ``e`` (as
        ``wait_for_ready``; a load test counts it as HTTP_503)."""
        if not self._should_retry(e, attempt, path):
            raise HttpChatError(503, f"{self.base_url}{path}: no answer after {attempt} "
                                     f"attempt{'s' if attempt > 1 else ''}: {type(e).__name__}: {e}",
                                "unavailable") from e
        return attempt + 1

    @classmethod
    def _raise_status(cls, response) -> None:
        """An error status is the server's answer: raise it (never sent again), even if its body was cut."""
        try:
            response.read()
        except _DROPPED as e:
            raise HttpChatError(response.status_code, f"error body cut: {type(e).__name__}: {e}") from e
        cls._raise(response)

    def _should_retry(self, e: Exception, attempt: int, path: str) -> bool:
        """True (after a backoff) if a call that failed with ``e`` before any response may be sent again."""
        if attempt >= CALL_ATTEMPTS or self._closed.is_set():
            return False
        backoff = random.uniform(0, min(RETRY_BACKOFF_S[1], RETRY_BACKOFF_S[0] * 2 ** (attempt - 1)))
        logger.info("POST %s failed with no response (%s: %s); retrying, attempt %d of %d", path,
                    type(e).__name__, e, attempt + 1, CALL_ATTEMPTS)
        # The backoff between attempts; close() ends it early, and then nothing is sent again.
        return not self._closed.wait(backoff)

    @staticmethod
    def _raise(response) -> None:
        """HttpChatError from an error answer: the OpenAI error object's message and code where the body is one (a
        proxy's JSON of another shape, ``"Bad Gateway"`` or ``{"error": "..."}``, is still this status's error)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        err = {"message": err} if isinstance(err, str) else err if isinstance(err, dict) else {}
        message, code = err.get("message"), err.get("code")
        raise HttpChatError(response.status_code, str(message) if message not in (None, "") else response.text[:200],
                            None if code is None else str(code))

    def wait_for_ready(self, timeout: float = 10.0) -> None:
        """Block until ``/readyz`` answers 200 (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise HttpChatError(503, f"{self.base_url} was not ready within {timeout:g} s", "unavailable")
            time.sleep(0.05)  # polling a probe, bounded by the deadline

    def reply_stream(self, text: str, model: str | None = None, *, max_new_tokens: int | None = None,
                     min_new_tokens: int | None = None, **_: Any) -> Iterator[HttpChunk]:
        """Stream a reply (``stream: true``): one :class:`HttpChunk` per token, then a final one."""
        body: dict[str, Any] = {"messages": [{"role": "user", "content": text}], "stream": True,
                                "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        if max_new_tokens is not None:
            body["max_tokens"] = max_new_tokens
        if min_new_tokens is not None:
            body["min_tokens"] = min_new_tokens
        path, attempt, rid = "/v1/chat/completions", 1, new_request_id()
        while True:
            yielded = False
            try:
                with closing(self._send(path, body, rid)) as response:
                    if response.status_code != 200:
                        self._raise_status(response)
                    finish, usage, chunks, done = None, None, 0, False
                    for line in response.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = self._stream_event(data, path)
                        chunks += 1
                        if "error" in chunk:
                            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                            raise HttpChatError(200, err.get("message", ""), err.get("code"))
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        for choice in chunk.get("choices") or ():
                            delta = choice.get("delta") or {}
                            # One chunk per token (its text may still be empty); the opening role chunk is not one.
                            if "content" in delta and "role" not in delta:
                                yielded = True
                                yield HttpChunk(text=delta["content"] or "")
                            if choice.get("finish_reason"):
                                finish = choice["finish_reason"]
                    # A stream is whole only once "data: [DONE]" arrived: a connection closed before it (a replica
                    # killed mid-reply, a proxy's cut) or a 200 that is no SSE stream at all is no reply.
                    if not chunks:
                        raise HttpStreamError(
                            f"{self.base_url}{path} answered 200 without a chat completion stream (Content-Type "
                            f"{response.headers.get('content-type', 'none')!r}, "
                            f"{'only data: [DONE]' if done else 'no SSE data: line'}); is it chatforge's HTTP port "
                            "(serve --http-port)?", "not_a_chat_stream")
                    if not done:
                        raise HttpStreamError(f"{self.base_url}{path}: the stream ended after {chunks} chunk"
                                              f"{'s' if chunks != 1 else ''} without data: [DONE] (cut short)",
                                              "incomplete_stream")
                    yield HttpChunk(is_final=True, finish_reason=finish,
                                    completion_tokens=usage.get("completion_tokens") if usage else None)
                    return
            except _DROPPED as e:
                if yielded:  # a token reached the caller: sending again would repeat or splice the reply
                    raise
                attempt = self._next_attempt(e, attempt, path)

    def _stream_event(self, data: str, path: str) -> dict[str, Any]:
        """One SSE ``data:`` payload as the JSON object a chat completion chunk is; HttpStreamError otherwise."""
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise HttpStreamError(f"{self.base_url}{path} sent a stream event that is not a JSON object: "
                                  f"{data[:80]!r}", "not_a_chat_stream")
        if "error" not in event and not _is_chunk(event):  # else reply_stream failed on it (AttributeError...)
            raise HttpStreamError(f"{self.base_url}{path} sent a stream event that is not a chat completion chunk "
                                  f"(choices, delta, content or usage of another type): {data[:80]!r}",
                                  "not_a_chat_stream")
        return event

    def classify(self, text: str, model: str | None = None) -> dict[str, Any]:
        path, body, attempt = "/v1/classify", {"text": text, **({"model": model} if model else {})}, 1
        rid = new_request_id()
        while True:
            try:
                with closing(self._send(path, body, rid)) as response:
                    if response.status_code != 200:
                        self._raise_status(response)
                    response.read()
                return response.json()
            except _DROPPED as e:  # unanswered or cut: classifying again is safe (idempotent)
                attempt = self._next_attempt(e, attempt, path)

    def health(self, service: str = "") -> str:
        """``""``: liveness (``/healthz``); anything else: readiness (``/readyz``). SERVING or NOT_SERVING."""
        response = self._http.get("/healthz" if not service else "/readyz")
        return "SERVING" if response.status_code == 200 else "NOT_SERVING"
