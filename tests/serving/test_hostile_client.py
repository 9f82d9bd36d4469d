"""A hostile client against the HTTP surface: inputs that once answered 500 (or worse, failed other
callers' streams) now get a 4xx naming the field, and the server keeps serving.

Found by attacking a real ``chatforge serve --http-port`` process with a tiny bundle; reproduced here
in-process (``ServerThread``, 127.0.0.1, fake or gated models) where the bug shows the same way.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from tests.serving.conftest import base_url
from tests.serving_fakes import WAIT, GatedGenerator, ServerThread, make_engine

from chatforge.decoding import GenerationOptions, choose_next, top_k_top_p_filter
from chatforge.serving.engine import Engine


def chat(text: str = "hi", **kw) -> dict:
    return {"messages": [{"role": "user", "content": text}], **kw}


def assert_still_serving(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200
    r = http.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ sampling at the float limits
@pytest.mark.parametrize("temperature", [5e-324, 1e-310, 1e-300])
def test_choose_next_with_a_temperature_below_float64s_range_samples_the_argmax(temperature):
    """The HTTP surface takes any float64 temperature in (0, 2]: 5e-324 overflowed even the float64
    path (logits / t = inf, softmax NaN) and torch.multinomial raised."""
    logits = torch.tensor([[0.5, 3.0, -1.0, float("-inf")], [2.0, -2.0, 1.0, 0.0]])
    opts = GenerationOptions(do_sample=True, temperature=temperature)
    assert choose_next(logits, opts, torch.Generator().manual_seed(0)).tolist() == [1, 0]


def test_top_p_below_float32s_range_keeps_the_best_token():
    """top_p=1e-300 is in (0, 1] but is 0 as a float32: every token was filtered out (all -inf)."""
    logits = torch.tensor([[0.5, 3.0, -1.0]])
    assert torch.isfinite(top_k_top_p_filter(logits, top_p=1e-300)).tolist() == [[False, True, False]]
    opts = GenerationOptions(do_sample=True, temperature=1.0, top_p=1e-300)
    assert choose_next(logits, opts, torch.Generator().manual_seed(0)).tolist() == [1]


@pytest.mark.parametrize("extra", [{"temperature": 5e-324}, {"temperature": 1.0, "top_p": 1e-300}],
                         ids=["temperature-5e-324", "top_p-1e-300"])
def test_extreme_sampling_values_neither_fail_the_request_nor_the_streams_beside_it(extra):
    """Over HTTP, ``temperature: 5e-324`` (or ``top_p: 1e-300``) made the model's step raise: the
    caller got 500 ``internal error`` and so did every stream in the same running batch."""
    gate = threading.Semaphore(0)  # each decoding step of the victim waits for a permit
    engine = Engine({"gated": GatedGenerator(gate=gate)}, {})
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        attacker: dict = {}
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http, \
                http.stream("POST", "/v1/chat/completions", json=chat(stream=True, max_tokens=4)) as victim:
            lines = victim.iter_lines()
            assert next(lines).startswith("data: ")  # the victim runs (its prefill is done)

            def attack():
                with httpx.Client(base_url=base_url(st), timeout=WAIT) as other:
                    attacker["r"] = other.post("/v1/chat/completions", json=chat(max_tokens=1, **extra))

            thread = threading.Thread(target=attack)
            thread.start()
            # The attacker waits in the queue while the victim's step holds the batch: it joins the batch
            # (and is prefilled beside the victim) when the step ends.
            assert engine.stats.wait_for(lambda s: s.waiting == 1, WAIT)
            gate.release(3)
            thread.join(WAIT)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        r = attacker["r"]
        assert r.status_code == 200, r.text
        assert events[-1] == "[DONE]"
        assert all("error" not in json.loads(e) for e in events[:-1]), events
        assert [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
        gate.release(100)
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            assert http.get("/healthz").status_code == 200
        assert engine.stats.failed == 0


# ------------------------------------------------------------------------ text that is no Unicode
def _raw(http: httpx.Client, body: str, path: str = "/v1/chat/completions") -> httpx.Response:
    """``body`` is sent as written (JSON escapes such as \\ud800 included)."""
    return http.post(path, content=body.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("body, param", [
    ('{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    ('{"messages": [{"role": "user", "content": "\\udfff"}], "stream": true}', "messages[0].content"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', "messages[0].content"),
    ('{"messages": [{"role": "assistant", "content": "a\\ud800"}, {"role": "user", "content": "hi"}]}',
     "messages[0].content"),
    ('{"messages": [{"role": "system", "content": "\\udc00"}, {"role": "user", "content": "hi"}]}',
     "messages[0].content"),
    ('{"messages": [{"role": "user", "content": "hi"}], "stop": ["x", "\\ud800"]}', "stop[1]"),
], ids=["user", "user-streamed", "user-part", "assistant", "system", "stop"])
def test_a_lone_surrogate_is_400_naming_the_field(served, body, param):
    """A JSON escape of half a surrogate pair is no character: the model's tokenizer raised
    (500 ``internal error``) and a system prompt with one failed the conversation store's write."""
    st, http = served
    r = _raw(http, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert "lone surrogate" in err["message"] and "allowed" in err["message"]
    assert_still_serving(http)


def test_an_escaped_surrogate_pair_is_a_character_and_is_accepted(served):
    st, http = served
    r = _raw(http, '{"messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}], "max_tokens": 2}')
    assert r.status_code == 200, r.text
    assert st.server.engine.generators["echo"].calls[-1][0] == "hi \U0001F600"


def test_a_lone_surrogate_never_reaches_the_store(tmp_path):
    from chatforge.serving.store import ConversationStore

    store = ConversationStore(f"sqlite:///{tmp_path / 'c.db'}")
    with ServerThread(make_engine(), http_port=0, store=store) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            bad = _raw(http, '{"messages": [{"role": "system", "content": "\\ud800"}, '
                             '{"role": "user", "content": "hello"}], "user": "bad"}')
            good = http.post("/v1/chat/completions", json=chat("hello", user="good"))
    assert bad.status_code == 400 and good.status_code == 200
    assert store.flush(WAIT)
    assert [row["session_id"] for row in store.iter_rows()] == ["good"]
    assert store.failed == 0
    store.close()


# -------------------------------------------------------------------------------- deep JSON
@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}",
], ids=["top-level", "in-a-field"])
def test_json_nested_too_deeply_is_400_not_a_500_and_a_reset_connection(served, body):
    """Python's JSON parser raises RecursionError past ~1000 levels: it escaped as a plain-text
    ``500 Internal Server Error`` and the server reset the connection."""
    st, http = served
    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "body" and "nested too deeply" in err["message"]
    assert_still_serving(http)  # on the same keep-alive connection


# ------------------------------------------------------------------------------ protocol edges
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/", "/static/chat.js", "/v1/models", "/v1/models/echo"])
def test_head_is_answered_where_get_is(served, path):
    """HEAD (``curl -I``, uptime checkers) was 405 on every GET endpoint; RFC 9110 asks for it."""
    st, http = served
    get, head = http.get(path), http.head(path)
    assert head.status_code == get.status_code == 200, head
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert http.get("/healthz").status_code == 200  # the connection is still in step


def _raw_exchange(port: int, request: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("version, extra", [(b"HTTP/1.0", b""), (b"HTTP/1.1", b"Connection: close\r\n")])
def test_a_stream_to_a_client_that_closes_says_connection_close_only(served, version, extra):
    """An SSE response carried a fixed ``connection: keep-alive`` beside the server's ``connection: close``."""
    st, http = served
    body = json.dumps(chat(stream=True, max_tokens=2)).encode()
    raw = _raw_exchange(st.server.http.port, b"POST /v1/chat/completions " + version + b"\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\n" + extra +
                        b"Content-Length: %d\r\n\r\n" % len(body) + body)
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower().split("\r\n")
    assert head[0].endswith("200 ok"), head
    assert [h for h in head if h.startswith("connection:")] == ["connection: close"]
    assert b"data: [DONE]" in raw


def test_a_stream_to_an_http_1_0_client_is_close_delimited_not_chunked(served):
    """HTTP/1.0 has no chunked transfer coding (RFC 9112 section 6.1): uvicorn framed a streamed reply in chunks
    anyway, so a 1.0 client saw chunk sizes inside its events. The body now ends where the connection does."""
    st, http = served
    body = json.dumps(chat(stream=True, max_tokens=3)).encode()
    raw = _raw_exchange(st.server.http.port, b"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head, payload = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").lower().split("\r\n")
    assert lines[0].endswith("200 ok"), lines
    assert not [h for h in lines if h.startswith(("transfer-encoding:", "content-length:"))], lines
    assert "connection: close" in lines
    events = [e for e in payload.decode().split("\n\n") if e]
    assert events and all(e.startswith("data: ") for e in events), payload[:200]  # no chunk sizes between them
    assert events[-1] == "data: [DONE]"
    deltas = [json.loads(e[6:]) for e in events[:-1]]
    assert deltas[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # a reply of known length (a plain JSON body) to HTTP/1.0 keeps its Content-Length
    raw = _raw_exchange(st.server.http.port, b"GET /v1/models HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    head, payload = raw.split(b"\r\n\r\n", 1)
    assert f"content-length: {len(payload)}" in head.decode("latin-1").lower().split("\r\n")
    assert json.loads(payload)["object"] == "list"
    assert http.get("/v1/models").status_code == 200  # and HTTP/1.1 clients are served as before


def test_http_401_names_the_header_and_the_scheme():
    from chatforge.serving.security import ApiKeyAuth

    with ServerThread(make_engine(), http_port=0, auth=ApiKeyAuth(["k1"])) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            missing = http.get("/v1/models")
            malformed = http.get("/v1/models", headers={"authorization": "Basic k1"})
            assert http.get("/v1/models", headers={"authorization": "Bearer k1"}).status_code == 200
    assert missing.status_code == malformed.status_code == 401
    assert missing.headers["www-authenticate"] == malformed.headers["www-authenticate"] == "Bearer"
    assert "header 'Authorization: Bearer <key>'" in missing.json()["error"]["message"]
    assert "metadata" not in missing.json()["error"]["message"] + malformed.json()["error"]["message"]


# ------------------------------------------------------------------------------ the metrics port
def test_metrics_port_answers_head_like_get():
    from chatforge.serving.metrics import MetricsHTTPServer, ServingMetrics

    with MetricsHTTPServer(ServingMetrics(process_metrics=False), "127.0.0.1", 0) as server:
        url = f"http://127.0.0.1:{server.port}"
        for path in ("/healthz", "/readyz", "/metrics"):
            get, head = httpx.get(url + path, timeout=WAIT), httpx.head(url + path, timeout=WAIT)
            assert head.status_code == get.status_code == 200, (path, head.status_code)  # was 501
            assert head.content == b"" and head.headers["content-length"] == get.headers["content-length"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_metrics_port_answers_other_methods_405_naming_the_allowed_ones(method):
    """http.server answered them with its own 501 HTML page ("Unsupported method")."""
    from chatforge.serving.metrics import MetricsHTTPServer, ServingMetrics

    with MetricsHTTPServer(ServingMetrics(process_metrics=False), "127.0.0.1", 0) as server:
        url = f"http://127.0.0.1:{server.port}"
        r = httpx.request(method, url + "/metrics", content=b"x" * 100, timeout=WAIT)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", (r.status_code, r.text)
        assert r.text == f"{method} is not allowed here; allowed: GET, HEAD\n"
        assert httpx.get(url + "/healthz", timeout=WAIT).status_code == 200


def test_metrics_port_caps_its_connection_threads(monkeypatch):
    """A thread per connection without bound: silent connections each held one (for up to the read timeout).
    One over the cap now gets 503 at once; a closed connection frees its place."""
    import socket

    from chatforge.serving import metrics as metrics_module
    from chatforge.serving.metrics import MetricsHTTPServer, ServingMetrics

    monkeypatch.setattr(metrics_module, "MAX_CONNECTIONS", 2)
    with MetricsHTTPServer(ServingMetrics(process_metrics=False), "127.0.0.1", 0) as server:
        addr = ("127.0.0.1", server.port)
        held = [socket.create_connection(addr, timeout=WAIT) for _ in range(2)]
        try:
            with socket.create_connection(addr, timeout=WAIT) as extra:
                reply = _read_all(extra)
            assert reply.startswith(b"HTTP/1.1 503 ") and reply.endswith(b"too many connections\n")
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + WAIT  # the handler threads see the closes and give their places back
        while (status := httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=WAIT).status_code) != 200:
            assert status == 503 and time.monotonic() < deadline


def test_metrics_port_drops_a_client_that_never_finishes_its_request(monkeypatch):
    """A thread per connection: a client sending half a request line held its thread forever."""
    import socket

    from chatforge.serving import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "REQUEST_READ_TIMEOUT_S", 0.2)
    with metrics_module.MetricsHTTPServer(metrics_module.ServingMetrics(process_metrics=False),
                                          "127.0.0.1", 0) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as slow:
            slow.sendall(b"GET /heal")
            assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=WAIT).status_code == 200
            assert slow.recv(1024) == b""  # closed by the server (a socket timeout here would fail the test)


# ------------------------------------------------------------------ the API port's connections
def _read_all(sock) -> bytes:
    """Everything the server sends until it closes (a socket timeout here fails the test)."""
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


def test_api_port_answers_408_to_a_client_that_trickles_its_headers(monkeypatch, served):
    """uvicorn has no deadline for a request's head: a client that sent half its headers (slowloris) held
    its connection and file descriptor for good. Now it gets 408 and is closed; others are served."""
    import socket

    from chatforge.serving import http as http_module

    monkeypatch.setattr(http_module, "REQUEST_HEAD_TIMEOUT_S", 0.3)
    st, http = served
    with socket.create_connection(("127.0.0.1", st.server.http.port), timeout=WAIT) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: appl")
        assert_still_serving(http)  # served meanwhile, on another connection
        reply = _read_all(slow)
    assert reply.startswith(b"HTTP/1.1 408 ")
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]  # the API's error object, as for every error
    assert error["code"] == "request_timeout" and "request headers not received in time" in error["message"]


def test_api_port_closes_a_connection_that_never_sends_a_request(monkeypatch, served):
    import socket

    from chatforge.serving import http as http_module

    monkeypatch.setattr(http_module, "IDLE_CONNECTION_TIMEOUT_S", 0.3)
    st, http = served
    with socket.create_connection(("127.0.0.1", st.server.http.port), timeout=WAIT) as idle:
        assert _read_all(idle) == b""  # closed without a word, as an idle keep-alive connection is


def test_api_port_caps_its_connections_and_keeps_serving(monkeypatch, served):
    """Connections that never send a request took one file descriptor each, without bound: enough of them
    exhaust the process's descriptors ("Too many open files") for gRPC and the store too. One over the cap
    now gets 503 and is closed at once, and a slot frees when a connection closes."""
    import socket

    from chatforge.serving import http as http_module

    monkeypatch.setattr(http_module, "max_http_connections", lambda: 3)
    st, http = served
    addr = ("127.0.0.1", st.server.http.port)
    held = [socket.create_connection(addr, timeout=WAIT) for _ in range(3)]
    try:
        with socket.create_connection(addr, timeout=WAIT) as extra:
            reply = _read_all(extra)
        assert reply.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in reply
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        held.pop().close()
        connections = st.server.http._server.server_state.connections
        deadline = time.monotonic() + WAIT  # the server sees the close on its own loop
        while len(connections) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as fresh:  # a freed slot serves again
            assert_still_serving(fresh)
    finally:
        for s in held:
            s.close()


# ------------------------------------------------------------------ types are checked, not coerced
@pytest.mark.parametrize("field, value", [("max_tokens", "5"), ("max_tokens", True), ("min_tokens", "1"),
                                          ("temperature", "0.5"), ("top_p", True), ("seed", "7"),
                                          ("stream", "true"), ("stream", 1), ("n", "1")])
def test_a_value_of_the_wrong_type_is_400_naming_the_field(served, field, value):
    """Pydantic's lax mode read ``"max_tokens": "5"`` as 5 and ``true`` as 1 (and ``"stream": "true"`` as a
    stream): a client's slip was answered as if it meant something. OpenAI's API refuses them; so does this."""
    st, http = served
    r = http.post("/v1/chat/completions", json={**chat(max_tokens=2), field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error", err
    assert_still_serving(http)


def test_an_integer_is_a_number(served):
    st, http = served
    r = http.post("/v1/chat/completions", json=chat(max_tokens=2, temperature=1, top_p=1))
    assert r.status_code == 200, r.text


def test_classify_refuses_a_text_of_the_wrong_type(served):
    st, http = served
    r = http.post("/v1/classify", json={"text": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text", r.text


# ------------------------------------------------------------------ the gRPC port's connections
def _silent_connections(target: str, n: int):
    import socket

    host, port = target.rsplit(":", 1)
    return [socket.create_connection((host, int(port)), timeout=WAIT) for _ in range(n)]


def test_grpc_port_closes_a_connection_that_never_sends_its_preface(monkeypatch):
    """grpc's default handshake timeout (120 s) let a client that opened connections and sent nothing hold
    each one (and a file descriptor) for two minutes; the server now bounds the handshake."""
    from chatforge.client import ChatbotClient
    from chatforge.serving import server as server_module

    monkeypatch.setattr(server_module, "HANDSHAKE_TIMEOUT_MS", 300)
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        (silent,) = _silent_connections(st.target, 1)
        with silent:
            assert _read_all(silent).startswith(b"\x00")  # the server's SETTINGS frame, then it closes
        with ChatbotClient(st.target, timeout=WAIT) as client:
            assert client.health() == "SERVING"


def test_grpc_server_bounds_the_handshake_and_caps_connections_by_default():
    from chatforge.runtime import fd_budget
    from chatforge.serving.server import ChatbotServer

    options = dict(ChatbotServer(make_engine(), "127.0.0.1", 0)._options)
    assert 0 < options["grpc.server_handshake_timeout_ms"] <= 10_000
    assert options["grpc.max_allowed_incoming_connections"] == fd_budget(0.5)


def test_grpc_port_caps_its_connections_and_serves_again_when_one_closes(monkeypatch):
    """Connections that never make a call took a descriptor each without bound; past the cap a new one is
    now refused (the client sees UNAVAILABLE and may retry elsewhere), and one closing frees a place."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from chatforge.client import ChatbotClient, ChatbotError
    from chatforge.serving import server as server_module

    monkeypatch.setattr(server_module, "fd_budget", lambda share: 3)
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        held = _silent_connections(st.target, 3)
        try:
            with grpc.insecure_channel(st.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + WAIT  # the server sees the closes on its own threads
        while True:
            try:
                with ChatbotClient(st.target, timeout=2) as client:
                    assert client.health() == "SERVING"
                break
            except ChatbotError:
                if time.monotonic() > deadline:
                    raise


@pytest.mark.parametrize("value", ["1_0", "1e3", "infinity", "0x10", "+3", "-1", "0", "5 s"])
def test_x_request_timeout_takes_a_decimal_number_of_seconds_only(served, value):
    """Python's float() read "1_0" as 10 s and "1e3" as 1,000 s: not numbers as HTTP headers write them."""
    st, http = served
    r = http.post("/v1/chat/completions", json=chat(max_tokens=2), headers={"X-Request-Timeout": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Timeout", (value, r.text)


@pytest.mark.parametrize("value", ["10", "2.5", ".5", "3."])
def test_x_request_timeout_accepts_decimal_seconds(served, value):
    st, http = served
    r = http.post("/v1/chat/completions", json=chat(max_tokens=2), headers={"X-Request-Timeout": value})
    assert r.status_code == 200, (value, r.text)


# ------------------------------------------------ OpenAI parameters this server cannot honour
_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("field, value, allowed", [
    ("tools", [_TOOL], "omitted or []"),
    ("tool_choice", "required", "omitted, 'none' or 'auto'"),
    ("tool_choice", {"type": "function", "function": {"name": "get_weather"}}, "omitted, 'none' or 'auto'"),
    ("functions", [_TOOL["function"]], "omitted or []"),
    ("function_call", {"name": "get_weather"}, "omitted, 'none' or 'auto'"),
    ("response_format", {"type": "json_object"}, "omitted or {'type': 'text'}"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
     "omitted or {'type': 'text'}"),
    ("logprobs", True, "omitted or false"),
    ("top_logprobs", 3, "omitted or 0"),
    ("logit_bias", {"42": 100}, "omitted or {}"),
    ("modalities", ["text", "audio"], "omitted or ['text']"),
    ("audio", {"voice": "alloy", "format": "wav"}, "omitted"),
])
def test_a_parameter_that_would_change_the_reply_and_is_not_supported_is_400_not_ignored(served, field, value,
                                                                                       allowed):
    """These were accepted and silently ignored: a client asking for JSON output, tool calls or log-probabilities
    got a plain reply and a 200, as if it had been honoured. Each is now a 400 naming the field and what is
    allowed; their neutral values (what SDKs send by default) still pass."""
    st, http = served
    r = http.post("/v1/chat/completions", json={**chat(max_tokens=2), field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error", err
    assert "not supported" in err["message"] and f"allowed: {allowed}" in err["message"], err["message"]
    assert_still_serving(http)


def test_the_neutral_values_sdks_send_by_default_are_accepted(served):
    st, http = served
    neutral = {"tools": [], "tool_choice": "none", "functions": [], "function_call": "auto",
               "response_format": {"type": "text"}, "logprobs": False, "top_logprobs": 0, "logit_bias": {},
               "frequency_penalty": 0, "presence_penalty": 0.0, "modalities": ["text"], "parallel_tool_calls": True,
               "store": False, "metadata": {"k": "v"}, "service_tier": "auto", "unknown_future_field": 1}
    r = http.post("/v1/chat/completions", json={**chat(max_tokens=2), **neutral})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    # and null, which some clients send for every field they leave unset
    r = http.post("/v1/chat/completions", json={**chat(max_tokens=2), **{k: None for k in neutral}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "hi"])
def test_a_content_part_other_than_text_is_400_naming_the_message(served, part):
    """An image part got "messages[0].content.str=list is invalid: Input should be a valid string" (pydantic's
    first branch of the union), which names neither the part nor what is allowed."""
    st, http = served
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}], "max_tokens": 2}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content", err
    assert "part 1 is of type" in err["message"] and "only text parts are supported" in err["message"]
    ok = http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}]}]})
    assert ok.status_code == 200, ok.text


# ------------------------------------------------------------------------ session ids
def test_an_over_long_or_nul_session_header_is_400_not_cut(tmp_path):
    """X-Session-Id was cut to its first 128 characters, so two clients whose ids shared them wrote into one
    conversation (the body's ``user`` was already refused past 128); a NUL in it or in ``user`` reached the store,
    where PostgreSQL cannot hold it."""
    from chatforge.serving.store import ConversationStore

    store = ConversationStore(f"sqlite:///{tmp_path / 'c.db'}")
    with ServerThread(make_engine(), http_port=0, store=store) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            for sid in ("s" * 128 + "a", "s" * 128 + "b"):
                r = http.post("/v1/chat/completions", json=chat(max_tokens=2), headers={"x-session-id": sid})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["message"] == ("X-Session-Id header is 129 characters long; allowed: at "
                                                        "most 128")
            r = http.post("/v1/classify", json={"text": "hi"}, headers={"x-session-id": "s" * 129})
            assert r.status_code == 400, r.text
            r = http.post("/v1/chat/completions", json=chat(max_tokens=2, user="a\x00b"))
            assert r.status_code == 400 and "NUL" in r.json()["error"]["message"], r.text
            r = http.post("/v1/chat/completions", json=chat("x\x00y", max_tokens=2))
            assert r.status_code == 400 and "NUL" in r.json()["error"]["message"], r.text
            r = http.post("/v1/chat/completions", json=chat(max_tokens=2), headers={"x-session-id": "s" * 128})
            assert r.status_code == 200, r.text
            assert_still_serving(http)
    store.flush()
    assert [t["user_text"] for t in store.session("s" * 128)] == ["hi"]
    assert store.session("s" * 128 + "a") == [] and store.session("a\x00b") == []


@pytest.mark.parametrize("body, param", [
    ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    ('{"messages": [{"role": "user", "content": "hi"}], "stop": 5}', "stop"),
], ids=["content", "stop"])
def test_a_wrong_type_in_a_union_field_names_the_field_not_pydantics_branch(served, body, param):
    """The error's param read "messages[0].content.str": pydantic's name for the union member it tried first."""
    st, http = served
    r = _raw(http, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["message"].startswith(f"{param}=5 is invalid")


def test_an_integer_too_long_to_convert_is_a_400_naming_the_body(served):
    """A 5,000-digit max_tokens is valid JSON that Python will not convert: the answer was FastAPI's bare "There was
    an error parsing the body" with no param."""
    st, http = served
    r = _raw(http, '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "9" * 5000 + "}")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "body" and "4300 digits" in err["message"] and "sys." not in err["message"]
    assert_still_serving(http)
