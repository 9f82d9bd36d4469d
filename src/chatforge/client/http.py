"""A small blocking client of chatforge's HTTP surface, for ``chatforge loadtest --protocol http``
and benchmarks/http_vs_grpc.py: the same calls as :class:`~chatforge.client.channel.ChatbotClient`
(``reply_stream``, ``classify``, ``health``) over the OpenAI-compatible endpoints, so both surfaces
are measured the same way. Streams parse the SSE ``data:`` lines as any OpenAI client does.
Built on httpx; imports no torch and no grpc.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


class HttpChatError(Exception):
    """A failed HTTP call: the HTTP ``status``, the OpenAI error ``code`` and ``message``."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        self.status, self.message, self.code = status, message, code
        super().__init__(f"HTTP {status} ({code or 'error'}): {message}")

    @property
    def status_name(self) -> str:
        """The status as a load-test report counts it, e.g. ``HTTP_429``."""
        return f"HTTP_{self.status}"


@dataclass
class HttpChunk:
    """One token of a streamed reply, or (``is_final``) its end with the finish reason and usage."""

    text: str = ""
    is_final: bool = False
    finish_reason: str | None = None
    completion_tokens: int | None = None


class HttpChatClient:
    """Blocking calls to ``http://HOST:PORT`` (one pooled httpx client; thread-safe)."""

    def __init__(self, target: str, *, timeout: float = 30.0, api_key: str | None = None,
                 scheme: str = "http") -> None:
        if ":" not in target:
            raise ValueError(f"target={target!r} is invalid; allowed: HOST:PORT, e.g. 127.0.0.1:8080")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = f"{scheme}://{target}"
        # TCP_NODELAY as curl sets it: httpx writes a request's headers and body separately, and
        # with Nagle the body could wait for the server's delayed ACK.
        transport = httpx.HTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)

    def __enter__(self) -> HttpChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @staticmethod
    def _raise(response) -> None:
        try:
            err = response.json().get("error") or {}
        except ValueError:
            err = {}
        raise HttpChatError(response.status_code, str(err.get("message") or response.text[:200]), err.get("code"))

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
        with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                self._raise(response)
            finish, usage = None, None
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    raise HttpChatError(200, err.get("message", ""), err.get("code"))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    # One chunk per token (its text may still be empty); the opening role chunk is not one.
                    if "content" in delta and "role" not in delta:
                        yield HttpChunk(text=delta["content"] or "")
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
            yield HttpChunk(is_final=True, finish_reason=finish,
                            completion_tokens=usage.get("completion_tokens") if usage else None)

    def classify(self, text: str, model: str | None = None) -> dict[str, Any]:
        response = self._http.post("/v1/classify", json={"text": text, **({"model": model} if model else {})})
        if response.status_code != 200:
            self._raise(response)
        return response.json()

    def health(self, service: str = "") -> str:
        """``""``: liveness (``/healthz``); anything else: readiness (``/readyz``). SERVING or NOT_SERVING."""
        response = self._http.get("/healthz" if not service else "/readyz")
        return "SERVING" if response.status_code == 200 else "NOT_SERVING"
