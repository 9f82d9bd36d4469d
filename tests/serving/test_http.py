"""The HTTP surface (serving/http.py) end to end on 127.0.0.1 with fake models, through httpx.

The server is the real ChatbotServer with ``http_port=0``: gRPC and HTTP on one event loop,
sharing one engine, so these tests also show that both surfaces see the same state.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from tests.serving.conftest import assert_abandoned_then_freed, base_url
from tests.serving_fakes import (
    WAIT,
    BlockingGenerator,
    FakeClassifier,
    FakeGenerator,
    GatedGenerator,
    LockstepGenerator,
    ServerThread,
    make_engine,
)

from chatforge.client import ChatbotClient
from chatforge.serving.engine import Engine, PipelineConfig
from chatforge.serving.http import StopMatcher
from chatforge.serving.security import ApiKeyAuth


def sse_events(lines) -> list[str]:
    """The ``data:`` payloads of an SSE stream, in order (a strict reader: other lines must be blank,
    comments, or event fields we do not use)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[len("data: "):])
        else:
            assert line == "" or line.startswith(":"), f"unexpected SSE line {line!r}"
    return out


def chat(messages, **kw):
    return {"messages": [{"role": "user", "content": m} if isinstance(m, str) else m for m in messages], **kw}


def test_models_lists_every_served_model_with_version_and_task(served):
    st, http = served
    r = http.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    got = {m["id"]: (m["task"], m["version"], m["is_default"], m["object"]) for m in body["data"]}
    assert got == {"echo": ("generation", "1", True, "model"), "other": ("generation", "1", False, "model"),
                   "intents": ("classification", "1", True, "model")}
    assert r.headers["x-request-id"]
    assert http.get("/v1/models/other").json()["id"] == "other"
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_non_streamed_completion_has_content_usage_and_version(served):
    st, http = served
    r = http.post("/v1/chat/completions", json=chat(["an earlier question", {"role": "assistant", "content": "x"},
                                                     "hello there friend"], model="other", max_tokens=3))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "other"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello there"}  # 3 of FakeGenerator's tokens
    assert choice["finish_reason"] == "length"  # cut by max_tokens
    # The last user message is the input (3 words for the fake's whitespace token count).
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert body["chatforge"]["model_version"] == "1"
    assert body["id"] == f"chatcmpl-{r.headers['x-request-id']}"
    gen = st.server.engine.generators["other"]
    assert gen.calls[-1][0] == "hello there friend"
    assert gen.calls[-1][1].max_new_tokens == 3


def test_streamed_completion_is_openai_sse_ending_with_done(served):
    st, http = served
    with http.stream("POST", "/v1/chat/completions",
                     json=chat(["hi"], stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = sse_events(r.iter_lines())
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert pieces == ["Hel", "lo", " there", "!"]  # one chunk per token
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 4,
                                                                   "total_tokens": 5}


def test_stream_delivers_each_token_before_the_next_exists():
    gen = LockstepGenerator(n=4)
    with ServerThread(Engine({"lock": gen}, {}), http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http, \
                http.stream("POST", "/v1/chat/completions", json=chat(["go"], stream=True)) as r:
            pieces = []
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                content = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if content:
                    pieces.append(content)
                    gen.acks[len(pieces) - 1].set()  # the model makes the next token only now
    assert pieces == ["t0 ", "t1 ", "t2 ", "t3 "]


def test_stop_sequence_cuts_the_reply_streamed_and_not(served):
    st, http = served
    r = http.post("/v1/chat/completions", json=chat(["hi"], stop=[" the", "xyz"]))
    assert r.json()["choices"][0]["message"]["content"] == "Hello"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    with http.stream("POST", "/v1/chat/completions", json=chat(["hi"], stop="lo t", stream=True)) as s:
        data = [json.loads(d) for d in sse_events(s.iter_lines())[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in data)
    assert text == "Hel"


@pytest.mark.parametrize("stops,feed,want", [
    (["ab"], ["xa", "b", "c"], ("x", True)),
    (["ab"], ["xa", "c"], ("xac", False)),
    (["abc", "bd"], ["a", "b", "d"], ("a", True)),
    ([], ["a", "b"], ("ab", False)),
])
def test_stop_matcher_holds_back_only_possible_prefixes(stops, feed, want):
    m = StopMatcher(stops)
    out, hit = "", False
    for piece in feed:
        text, hit = m.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == want


@pytest.mark.parametrize("payload,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": "be nice"}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (chat(["hi"], temperature=3), "temperature"),
    (chat(["hi"], top_p=0), "top_p"),
    (chat(["hi"], n=2), "n"),
    (chat(["hi"], max_tokens=0), "max_tokens"),
    (chat(["hi"], max_tokens=5000), "max_tokens"),
    (chat(["hi"], stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(["hi"], seed=-1), "seed"),
    (chat(["hi"], max_tokens=3, min_tokens=4), "min_tokens"),
    (chat(["hi"], repetition_penalty=0.5), "repetition_penalty"),
    (chat(["hi"], no_repeat_ngram_size=17), "no_repeat_ngram_size"),
    (chat(["word " * 40]), "messages"),  # more tokens than the model accepts (engine check)
])
def test_validation_errors_are_400_naming_the_field(served, payload, param):
    st, http = served
    r = http.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert err["message"]


def test_malformed_json_is_400(served):
    st, http = served
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def test_unknown_model_is_404_with_the_list(served):
    st, http = served
    r = http.post("/v1/chat/completions", json=chat(["hi"], model="gpt-4"))
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["param"] == "model" and err["code"] == "model_not_found" and "echo" in err["message"]


def test_api_keys_apply_to_http_like_grpc():
    with ServerThread(make_engine(), http_port=0, auth=ApiKeyAuth(["s3cret"])) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            assert http.get("/v1/models").status_code == 401
            bad = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
            ok = http.post("/v1/chat/completions", json=chat(["hi"]), headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200
            assert http.get("/healthz").status_code == 200  # probes need no key
            assert http.get("/").status_code == 200  # the page holds no data; its calls carry the key


def test_overload_is_429_with_retry_after():
    gate = threading.Semaphore(0)
    gen = GatedGenerator(gate=gate)
    engine = Engine({"gated": gen}, {}, max_running=1, max_queued=0)
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http, \
                http.stream("POST", "/v1/chat/completions", json=chat(["a"], stream=True, max_tokens=50)) as s1:
            lines = s1.iter_lines()
            assert next(lines).startswith("data: ")  # the first stream holds the only slot
            r = http.post("/v1/chat/completions", json=chat(["b"]))
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            for _ in range(60):
                gate.release()


def test_deadline_is_504():
    gen = BlockingGenerator(name="slow")
    with ServerThread(Engine({"slow": gen}, {}), http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            r = http.post("/v1/chat/completions", json=chat(["a"]), headers={"X-Request-Timeout": "0.2"})
            assert r.status_code == 504
            assert r.json()["error"]["code"] == "deadline_exceeded"
            gen.release.set()  # the model may go on now: the engine must stop it, the client is gone
            assert gen.closed.wait(WAIT) and gen.produced < gen.LIMIT
            bad = http.post("/v1/chat/completions", json=chat(["a"]), headers={"X-Request-Timeout": "soon"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Timeout"


def test_client_disconnect_mid_stream_frees_the_slot():
    gate = threading.Semaphore(0)
    gen = GatedGenerator(gate=gate)
    engine = Engine({"gated": gen}, {}, max_running=2)
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            with http.stream("POST", "/v1/chat/completions", json=chat(["a"], stream=True, max_tokens=500)) as s:
                for line in s.iter_lines():
                    if '"content":"<' in line:  # the first generated token arrived
                        break
                assert engine.active == 1
            # The connection is closed here. The server notices (http.disconnect), cancels the body task and
            # closes the engine's stream; the batcher drops the sequence at its next step, as for a gRPC cancel.
            assert_abandoned_then_freed(engine, gen, gate)


def test_classify_and_health(served):
    st, http = served
    r = http.post("/v1/classify", json={"text": "bye now"})
    assert r.status_code == 200
    body = r.json()
    assert (body["label"], body["model"], body["model_version"], body["out_of_scope"]) == ("bye", "intents", "1",
                                                                                          False)
    assert body["scores"] == {"greet": 0.1, "bye": 0.8, "oos": 0.1} and body["score"] == 0.8
    assert body["request_id"] == r.headers["x-request-id"]
    assert http.post("/v1/classify", json={"text": ""}).json()["error"]["param"] == "text"
    assert http.post("/v1/classify", json={"text": "x", "model": "nope"}).status_code == 404
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200


def test_pipeline_reports_intent_and_out_of_scope():
    engine = Engine({"echo": FakeGenerator()}, {"intents": FakeClassifier()},
                    pipeline=PipelineConfig("intents", "Sorry, out of scope.", threshold=0.9))
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            body = http.post("/v1/chat/completions", json=chat(["hello"])).json()
    assert body["choices"][0]["message"]["content"] == "Sorry, out of scope."
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["chatforge"]["out_of_scope"] is True and body["chatforge"]["intent"] == "greet"


def test_metrics_and_store_see_http_calls(tmp_path):
    from chatforge.serving.metrics import ServingMetrics
    from chatforge.serving.store import ConversationStore

    metrics = ServingMetrics()
    store = ConversationStore(f"sqlite:///{tmp_path / 'c.db'}")
    with ServerThread(make_engine(), http_port=0, metrics=metrics, store=store) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            r = http.post("/v1/chat/completions", json=chat(["hello"], user="u-1"))
            assert r.status_code == 200
    assert store.flush(WAIT)
    [turn] = list(store.iter_rows())
    assert (turn["session_id"], turn["user_text"], turn["reply"], turn["model"], turn["request_id"]) == (
        "u-1", "hello", "Hello there!", "echo", r.headers["x-request-id"])
    text = metrics.render().decode()
    assert 'rpc="/v1/chat/completions"' in text and 'status="OK"' in text
    store.close()


def test_draining_answers_503_and_readyz_flips():
    gen = BlockingGenerator(name="slow")
    with ServerThread(Engine({"slow": gen}, {}), http_port=0, grace=WAIT) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http, \
                http.stream("POST", "/v1/chat/completions", json=chat(["a"], stream=True)) as s:
            lines = s.iter_lines()
            next(lines)
            assert gen.first_sent.wait(WAIT)
            st.request_shutdown()  # SIGTERM: the open stream keeps the drain waiting
            assert st.run(_wait_for(lambda: st.server.gate.draining))
            r = http.post("/v1/chat/completions", json=chat(["b"]))
            assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
            assert r.headers["retry-after"] == "1"
            assert http.get("/readyz").status_code == 503
            gen.LIMIT = 3
            gen.release.set()
            rest = sse_events(lines)
            assert rest[-1] == "[DONE]"  # the in-flight stream finished during the drain
        st.join()


async def _wait_for(pred, timeout=WAIT):
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def test_both_surfaces_share_one_engine(served):
    st, http = served
    with ChatbotClient(st.target, timeout=WAIT) as client:
        grpc_text = "".join(c.text for c in client.reply_stream("hi") if not c.is_final)
    http_text = http.post("/v1/chat/completions", json=chat(["hi"])).json()["choices"][0]["message"]["content"]
    assert grpc_text == http_text == "Hello there!"
    assert st.server.engine.completed == 2


def test_openapi_document_lists_the_endpoints_and_400_not_422(served):
    st, http = served
    doc = http.get("/openapi.json").json()
    assert set(doc["paths"]) == {"/v1/models", "/v1/models/{model}", "/v1/chat/completions", "/v1/classify",
                                 "/healthz", "/readyz"}
    post = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "429", "503", "504"} <= set(post["responses"])
    assert all("422" not in op["responses"] for p in doc["paths"].values() for op in p.values())


def test_page_and_assets_are_served_locally(served):
    st, http = served
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/chat.js", "/static/chat.css"):
        assert http.get(asset).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere


def test_sse_wire_framing_with_curl(served):
    """The bytes on the wire, read by curl -N (no buffering): `data: <json>` events separated by a
    blank line, the last one `data: [DONE]`."""
    import re
    import shutil
    import subprocess

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    st, _ = served
    proc = subprocess.run(
        [curl, "-sN", "--max-time", str(int(WAIT)), "-H", "Content-Type: application/json",
         "-d", json.dumps(chat(["hi"], stream=True)), f"{base_url(st)}/v1/chat/completions"],
        capture_output=True, timeout=WAIT + 5, check=True)
    raw = proc.stdout.decode("utf-8")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    body = events[:-2]
    assert all(re.fullmatch(r"data: \{.*\}", e) for e in body), body
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in body) == "Hello there!"


def test_http_uses_the_servers_tls_too(tmp_path):
    """With --tls-cert/--tls-key the HTTP surface is HTTPS with the same certificate (never plaintext
    beside a TLS gRPC port); with a client CA it requires client certificates too."""
    import ssl

    from tests.serving.test_security import _certs

    from chatforge.serving.security import TlsConfig

    c = _certs(tmp_path)
    with ServerThread(make_engine(), http_port=0, tls=TlsConfig(c["server"], c["server_key"])) as st:
        st.wait_serving()
        url = f"https://127.0.0.1:{st.server.http.port}"
        ctx = ssl.create_default_context(cafile=str(c["ca"]))
        with httpx.Client(base_url=url, timeout=WAIT, verify=ctx) as https:
            assert https.get("/v1/models").status_code == 200
        with httpx.Client(base_url=url.replace("https", "http"), timeout=WAIT) as plain, \
                pytest.raises(httpx.HTTPError):
            plain.get("/v1/models")
    mtls = TlsConfig(c["server"], c["server_key"], client_ca_file=c["ca"])
    with ServerThread(make_engine(), http_port=0, tls=mtls) as st:
        st.wait_serving()
        url = f"https://127.0.0.1:{st.server.http.port}"
        with_cert = ssl.create_default_context(cafile=str(c["ca"]))
        with_cert.load_cert_chain(str(c["client"]), str(c["client_key"]))
        with httpx.Client(base_url=url, timeout=WAIT, verify=with_cert) as https:
            assert https.get("/v1/models").status_code == 200
        anon = ssl.create_default_context(cafile=str(c["ca"]))
        with httpx.Client(base_url=url, timeout=WAIT, verify=anon) as https, pytest.raises(httpx.HTTPError):
            https.get("/v1/models")


def test_http_port_taken_fails_the_start_with_the_address():
    import asyncio
    import socket

    from chatforge.serving.server import ChatbotServer

    async def start(port: int) -> None:
        server = ChatbotServer(make_engine(), "127.0.0.1", 0, http_port=port)
        await server.start()

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot bind HTTP 127.0.0.1:{port}"):
            asyncio.run(start(port))


def test_http_connections_have_nagle_off(served):
    """Responses go out as headers + body writes: with Nagle on, the second waited for the client's
    delayed ACK (40 ms per request on loopback). asyncio sets TCP_NODELAY only on connections of
    sockets made with proto=IPPROTO_TCP, which socket.create_server does not do."""
    import socket

    st, http = served
    assert http.get("/healthz").status_code == 200  # keeps its connection open (keep-alive)

    async def nodelay_flags():
        conns = st.server.http._server.server_state.connections
        return [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                for c in conns]

    flags = st.run(nodelay_flags())
    assert flags and all(flags), flags


def test_decoding_extensions_reach_the_model():
    """vLLM-style extensions beside the OpenAI fields: repetition_penalty and no_repeat_ngram_size."""
    gen = FakeGenerator("echo")
    with ServerThread(make_engine(generators={"echo": gen}), http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            r = http.post("/v1/chat/completions", json=chat(["hi"], repetition_penalty=1.3, no_repeat_ngram_size=3))
            assert r.status_code == 200, r.text
            r = http.post("/v1/chat/completions", json=chat(["hi"]))
            assert r.status_code == 200, r.text
    (_, tuned), (_, plain) = gen.calls
    assert (tuned.repetition_penalty, tuned.no_repeat_ngram_size) == (1.3, 3)
    assert (plain.repetition_penalty, plain.no_repeat_ngram_size) == (1.0, 0)


def test_a_body_over_the_message_limit_is_413_by_header_or_by_chunks_and_the_server_keeps_serving():
    """The HTTP surface has gRPC's --max-message-bytes limit: nothing read past it, announced or not."""
    with ServerThread(make_engine(), http_port=0, max_message_bytes=4096) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            big = chat(["x" * 10_000])
            r = http.post("/v1/chat/completions", json=big, headers={"x-request-id": "big-1"})
            assert r.status_code == 413 and r.headers["x-request-id"] == "big-1"
            err = r.json()["error"]
            assert err["code"] == "request_too_large" and "allowed: at most 4096" in err["message"]
            # No Content-Length (chunked): the chunks are counted as they arrive.
            payload = json.dumps(big).encode()
            chunked = http.post("/v1/classify", content=(payload[i:i + 1000] for i in range(0, len(payload), 1000)))
            assert "content-length" not in chunked.request.headers
            assert chunked.status_code == 413 and "more than 4096" in chunked.json()["error"]["message"]
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:  # a new connection: served as before
            ok = http.post("/v1/chat/completions", json=chat(["hello"]))
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello there!"
            small_chunked = json.dumps(chat(["hello"])).encode()
            r = http.post("/v1/chat/completions", content=iter([small_chunked[:10], small_chunked[10:]]),
                          headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text


def test_a_long_system_prompt_is_stored_not_held_to_the_models_input_limit(tmp_path):
    from chatforge.serving.store import ConversationStore

    store = ConversationStore(f"sqlite:///{tmp_path / 'c.db'}")
    system = "You are a helpful assistant. " * 40  # longer than this engine's 200-character input limit
    with ServerThread(make_engine(), http_port=0, store=store) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            r = http.post("/v1/chat/completions", json=chat([{"role": "system", "content": system}, "hello"],
                                                          user="sys-1"))
            assert r.status_code == 200, r.text
            long_turn = http.post("/v1/chat/completions", json=chat(["y" * 300, "hello"]))
            assert long_turn.status_code == 400 and long_turn.json()["error"]["param"] == "messages[0].content"
    assert store.flush(WAIT)
    [row] = [r for r in store.iter_rows() if r["session_id"] == "sys-1"]
    assert row["context"] == [{"role": "system", "text": system}]
    store.close()


@pytest.mark.parametrize("path, raw", [
    ("/v1/chat/completions", b"{bad"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": 5}], "n": "x"}).encode()),
    ("/v1/chat/completions", b"\xff\xfe{}"),  # not UTF-8
    ("/v1/classify", b"{bad"),
    ("/v1/classify", json.dumps({"text": 5, "extra": 1}).encode()),
    ("/v1/classify", b""),
])
def test_the_api_key_is_checked_before_the_body_is_parsed(monkeypatch, path, raw):
    """A client without a valid key got 400 for a body that is not JSON, and a 400 describing the schema for
    one that fails it: the server parsed and validated bodies for anyone. It now answers 401 first."""
    from chatforge.serving import http as http_module

    parsed = []
    real = http_module.parse_body
    monkeypatch.setattr(http_module, "parse_body", lambda *a, **kw: parsed.append(a) or real(*a, **kw))
    with ServerThread(make_engine(), http_port=0, auth=ApiKeyAuth(["s3cret"])) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = http.post(path, content=raw, headers={"content-type": "application/json", **headers})
                assert r.status_code == 401, r.text
                assert r.json()["error"]["type"] == "authentication_error"
            assert parsed == []
            # With the key, the same body is refused for what it is.
            r = http.post(path, content=raw, headers={"content-type": "application/json",
                                                      "Authorization": "Bearer s3cret"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_classify_and_chat_stay_documented_with_their_request_bodies(served):
    st, http = served
    doc = http.get("/openapi.json").json()
    for path, schema in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/classify", "ClassifyHttpRequest")):
        post = doc["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{schema}"
        assert {"200", "400", "401", "413"} <= set(post["responses"])


def _oos_engine() -> Engine:
    """Every message out of scope (the fake classifier's 0.8 is under the threshold): the reply is the
    pipeline's fallback, which the classifier "intents" gives, not the chat model."""
    return Engine({"chat": FakeGenerator("chat")}, {"intents": FakeClassifier()},
                  pipeline=PipelineConfig("intents", "Sorry, I can't help with that.", threshold=0.9))


def _without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")} | {
        "chatforge": {k: v for k, v in body["chatforge"].items() if k != "request_id"}}


def test_a_stop_sequence_in_the_fallback_reply_keeps_the_replys_metadata(tmp_path):
    """With ``stop``, the reply was complete at the stop sequence, before the engine's ReplyDone was read: an
    out-of-scope message came back with ``out_of_scope: false``, ``intent: null``, model "chat" and usage
    counted as if the chat model had run, and the store lost the turn's intent."""
    from chatforge.serving.store import ConversationStore

    store = ConversationStore(f"sqlite:///{tmp_path / 'c.db'}")
    with ServerThread(_oos_engine(), http_port=0, store=store) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            plain = http.post("/v1/chat/completions", json=chat(["hello"], user="plain")).json()
            cut = http.post("/v1/chat/completions", json=chat(["hello"], stop="I", user="cut")).json()
            with http.stream("POST", "/v1/chat/completions", json=chat(
                    ["hello"], stop="I", stream=True, stream_options={"include_usage": True})) as s:
                chunks = [json.loads(d) for d in sse_events(s.iter_lines())[:-1]]
    assert plain["chatforge"]["out_of_scope"] is True and plain["model"] == "intents"
    assert cut["choices"][0]["message"]["content"] == "Sorry, "
    want = _without_ids(plain)
    want["choices"][0]["message"]["content"] = "Sorry, "
    assert _without_ids(cut) == want
    final, usage = chunks[-2], chunks[-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Sorry, "
    assert final["choices"][0]["finish_reason"] == "stop"
    assert {k: v for k, v in final["chatforge"].items() if k != "request_id"} == want["chatforge"]
    assert usage["usage"] == plain["usage"]
    assert store.flush(WAIT)
    rows = {r["session_id"]: r for r in store.iter_rows()}
    assert (rows["cut"]["intent"], rows["cut"]["model"]) == (rows["plain"]["intent"], rows["plain"]["model"]) \
        == ("greet", "intents")
    store.close()


@pytest.mark.parametrize("stop", [None, "I"])
def test_every_chunk_of_a_streamed_fallback_reply_names_the_model_that_answered(stop):
    """The first chunks of a streamed fallback reply said "model": "chat" and the last ones "intents"."""
    with ServerThread(_oos_engine(), http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            whole = http.post("/v1/chat/completions", json=chat(["hello"], stop=stop)).json()
            with http.stream("POST", "/v1/chat/completions", json=chat(
                    ["hello"], stop=stop, stream=True, stream_options={"include_usage": True})) as s:
                chunks = [json.loads(d) for d in sse_events(s.iter_lines())[:-1]]
    assert whole["model"] == "intents"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["model"] for c in chunks] == ["intents"] * len(chunks)


def test_a_stop_sequence_in_a_generated_reply_keeps_the_pipelines_metadata(tmp_path):
    """A model's reply cut by a stop sequence ends before the engine's ReplyDone (it would come only once the model
    ran to its end), so its intent, intent_score and context turns came back null and the store lost the intent.
    The engine now hands the surface those facts before the model starts (``stream_reply(on_start=...)``)."""
    from chatforge.serving.store import ConversationStore

    engine = Engine({"chat": FakeGenerator("chat")}, {"intents": FakeClassifier()},
                    pipeline=PipelineConfig("intents", "Sorry, I can't help with that.", threshold=0.5))
    store = ConversationStore(f"sqlite:///{tmp_path / 'c.db'}")
    with ServerThread(engine, http_port=0, store=store) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            plain = http.post("/v1/chat/completions", json=chat(["hello"], user="plain")).json()
            cut = http.post("/v1/chat/completions", json=chat(["hello"], stop="there", user="cut")).json()
            with http.stream("POST", "/v1/chat/completions", json=chat(["hello"], stop="there", stream=True)) as s:
                final = [json.loads(d) for d in sse_events(s.iter_lines())[:-1]][-1]
    assert plain["chatforge"]["intent"] == "greet" and plain["model"] == "chat"
    assert cut["choices"][0]["message"]["content"] == "Hello "
    assert cut["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"]
    for got in (cut["chatforge"], final["chatforge"]):
        assert {k: v for k, v in got.items() if k != "request_id"} == \
            {k: v for k, v in plain["chatforge"].items() if k != "request_id"}
    assert cut["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert store.flush(WAIT)
    rows = {r["session_id"]: r for r in store.iter_rows()}
    assert (rows["cut"]["intent"], rows["cut"]["intent_score"]) == (rows["plain"]["intent"],
                                                                    rows["plain"]["intent_score"])
    store.close()


def test_a_stop_sequence_sent_decomposed_matches_the_composed_reply():
    """Before: a stop sequence in NFD Hangul (letters) never matched a reply, which is composed (syllables)."""
    import unicodedata

    gen = FakeGenerator("ko", tokens=("안녕", "하세요", " 반가워요", "!"))
    with ServerThread(Engine({"ko": gen}, {}), http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            r = http.post("/v1/chat/completions", json=chat(["hi"], stop=[unicodedata.normalize("NFD", " 반가")]))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "안녕하세요"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
