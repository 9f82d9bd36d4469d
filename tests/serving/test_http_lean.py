"""The lean chat-completions path of serving/http.py keeps FastAPI's behaviour.

``POST /v1/chat/completions`` is served by a plain Starlette route that validates the body itself
(``parse_chat_request``) and streams with ``SseResponse``; these tests hold it to what FastAPI
(``body: ChatCompletionRequest``) and sse-starlette did: the same 400s, the same chunk bytes, the
same idle pings and disconnect handling.
"""

from __future__ import annotations

import json
import logging
import threading
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient
from tests.serving_fakes import WAIT, GatedGenerator, ServerThread

from chatforge.serving import http as http_mod
from chatforge.serving.engine import Engine
from chatforge.serving.http import (
    ChatCompletionRequest,
    ClassifyHttpRequest,
    HttpSurface,
    _dumps,
    _events,
    _Reply,
)

USER = {"role": "user", "content": "hi"}


class _NoEngine:
    engine = None
    ready = False


@pytest.fixture(scope="module")
def both():
    """(the served app, a reference FastAPI app validating ``body: ChatCompletionRequest`` itself),
    the reference with the served app's exception handlers, so errors render the same way."""
    app = HttpSurface(_NoEngine()).app
    ref = FastAPI()
    for exc, handler in app.exception_handlers.items():
        ref.add_exception_handler(exc, handler)

    @ref.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return {"ok": True}

    @ref.post("/v1/classify")
    async def classify(request: Request, body: ClassifyHttpRequest):
        return {"ok": True}

    with TestClient(app) as served, TestClient(ref) as reference:
        yield served, reference


@pytest.mark.parametrize(("raw", "content_type"), [
    (b"{not json", "application/json"),
    (b"\xff\xfe{}", "application/json"),  # not UTF-8
    (b"", "application/json"),
    (b"[]", "application/json"),
    (b'"text"', "application/json"),
    (b'{"messages": []}', "application/json"),
    (json.dumps({"messages": [{"role": "wizard", "content": "a"}]}).encode(), "application/json"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}]}]}).encode(), "application/json"),
    (json.dumps({"messages": [USER], "temperature": 3}).encode(), "application/vnd.api+json"),
    (json.dumps({"messages": [USER], "stop": 5}).encode(), "application/json; charset=utf-8"),
    (json.dumps({"messages": [USER], "n": 2, "seed": -1}).encode(), "application/json"),
    (json.dumps({"messages": [USER]}).encode(), "text/plain"),  # not parsed as JSON, as FastAPI
    (json.dumps({"messages": [USER]}).encode(), None),
])
def test_invalid_bodies_get_fastapis_400(both, raw, content_type):
    served, reference = both
    headers = {"content-type": content_type} if content_type else {}
    want = reference.post("/v1/chat/completions", content=raw, headers=headers)
    got = served.post("/v1/chat/completions", content=raw, headers=headers)
    assert want.status_code == 400, want.text
    assert (got.status_code, got.json()) == (want.status_code, want.json())


@pytest.mark.parametrize(("raw", "content_type"), [
    (b"{not json", "application/json"),
    (b"\xff\xfe{}", "application/json"),
    (b"", "application/json"),
    (b"[]", "application/json"),
    (b"[" * 5000 + b"]" * 5000, "application/json"),
    (b'{"text": ""}', "application/json"),
    (b'{"text": 5}', "application/json"),
    (b'{"text": "hi", "extra": 1}', "application/vnd.api+json"),
    (b'{"text": "hi", "model": "' + b"m" * 300 + b'"}', "application/json"),
    (b'{"text": "hi"}', "text/plain"),
    (b'{"text": "hi"}', None),
])
def test_classify_bodies_get_fastapis_400(both, raw, content_type):
    """/v1/classify parses its body in the handler too (after the API key check), as FastAPI did before it."""
    served, reference = both
    headers = {"content-type": content_type} if content_type else {}
    got = served.post("/v1/classify", content=raw, headers=headers)
    assert got.status_code == 400, got.text
    if raw.startswith(b"[[["):  # Python's parser gives up: FastAPI's own answer is a 400 without detail
        assert "nested too deeply" in got.json()["error"]["message"]
        return
    want = reference.post("/v1/classify", content=raw, headers=headers)
    assert (got.status_code, got.json()) == (want.status_code, want.json())
    valid = served.post("/v1/classify", json={"text": "hi"})  # past validation: no engine loaded here
    assert valid.status_code == 503


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "application/merge-patch+json"])
def test_valid_bodies_pass_validation(both, content_type):
    served, reference = both
    raw = json.dumps({"messages": [{"role": "system", "content": "be brief"}, USER], "stream": True,
                      "max_tokens": 4, "extra_field": [1]}).encode()
    assert reference.post("/v1/chat/completions", content=raw, headers={"content-type": content_type}).json() \
        == {"ok": True}
    # past validation: the served app answers from the engine (none loaded here: 503)
    got = served.post("/v1/chat/completions", content=raw, headers={"content-type": content_type})
    assert got.status_code == 503 and got.json()["error"]["code"] == "unavailable"


@pytest.mark.parametrize("text", ["", "Hel", ' "quoted" \\ back\\slash', "ünïcödé ✓ 漢字", "line\nbreak\t\u2028",
                                  "\x00\x1f"])
def test_content_event_is_the_generic_chunk_byte_for_byte(text):
    engine = SimpleNamespace(default_generator="echo", version_of=lambda name: "3")
    call = SimpleNamespace(request_id="r-1")
    reply = _Reply(call, ChatCompletionRequest(messages=[USER]), "hi", [], engine)
    assert reply.content_event(text) == _events([_dumps(reply.chunk({"content": text}))])
    reply.model = "other"  # the head is rebuilt when the model changes
    assert reply.content_event(text) == _events([_dumps(reply.chunk({"content": text}))])
    assert b'"model":"other"' in reply.content_event(text)


def test_idle_stream_gets_pings_and_a_disconnect_ends_it_quietly(monkeypatch, caplog):
    """A stream waiting for its next token gets ``: ping`` comments (as sse-starlette sent every
    15 s; shortened here); closing the connection then abandons the request, with no error logged."""
    monkeypatch.setattr(http_mod, "PING_S", 0.05)
    gate = threading.Semaphore(0)
    gen = GatedGenerator(gate=gate)
    engine = Engine({"gated": gen}, {}, max_running=2)
    caplog.set_level(logging.WARNING)
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        url = f"http://127.0.0.1:{st.server.http.port}"
        with httpx.Client(base_url=url, timeout=WAIT) as http:
            body = {"messages": [USER], "stream": True, "max_tokens": 500}
            with http.stream("POST", "/v1/chat/completions", json=body) as s:
                seen_token, pings = False, 0
                for line in s.iter_lines():
                    seen_token = seen_token or '"content":"<' in line
                    if seen_token and line.startswith(":"):
                        assert line == ": ping"
                        pings += 1
                        if pings == 2:
                            break
                assert pings == 2 and engine.active == 1
            assert engine.stats.wait_for(lambda s: s.abandoned == 1, WAIT), "the disconnect was not noticed"
            for _ in range(100):
                gate.release()
            assert engine.stats.wait_for(lambda s: s.running == 0, WAIT)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_a_client_gone_while_sending_its_body_logs_no_error(caplog):
    """A client that closes the connection before its body is complete: the server answers as
    FastAPI did (a 400 nobody reads), logs no error, and keeps serving."""
    import socket

    caplog.set_level(logging.WARNING)
    with ServerThread(Engine({"gated": GatedGenerator(gate=threading.Semaphore(100))}, {}), http_port=0) as st:
        st.wait_serving()
        port = st.server.http.port
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 500\r\n\r\n{\"messages\": [")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as http:
            r = http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 2})
            assert r.status_code == 200, r.text  # still serving
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
