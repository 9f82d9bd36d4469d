"""The gRPC server end to end on 127.0.0.1 (port 0), with fake models."""

from __future__ import annotations

import logging
import select
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.serving_fakes import (
    TESTS_DIR,
    WAIT,
    BlockingGenerator,
    FailingGenerator,
    FakeClassifier,
    FakeGenerator,
    LockstepGenerator,
    ServerThread,
    make_engine,
)

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.serving.engine import Engine, EngineUnavailableError


@pytest.fixture
def server():
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        yield st


def test_tokens_are_streamed_one_by_one_not_buffered():
    gen = LockstepGenerator(n=4)
    with ServerThread(Engine({"lock": gen}, {})) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        chunks = []
        for chunk in client.reply_stream("hello there", max_new_tokens=10):
            chunks.append(chunk)
            if not chunk.is_final:
                # The model only produces the next token once this one reached the client.
                gen.acks[len(chunks) - 1].set()
    assert [c.text for c in chunks[:-1]] == ["t0 ", "t1 ", "t2 ", "t3 "]
    assert [c.token_id for c in chunks[:-1]] == [100, 101, 102, 103]
    final = chunks[-1]
    assert final.is_final and final.finish_reason == "stop"
    assert (final.prompt_tokens, final.completion_tokens, final.model) == (2, 4, "lock")
    assert final.request_id == client.last_request_id


def test_readiness_not_serving_while_loading_then_serving(tmp_path):
    release = threading.Event()

    def slow_loader():
        assert release.wait(WAIT)
        return make_engine()

    port_file = tmp_path / "port"
    with ServerThread(slow_loader, port_file=port_file) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        assert client.health() == "SERVING"  # liveness: the process is fine, just loading
        assert client.health("chatforge.v1.Chatbot") == "NOT_SERVING"  # readiness
        assert not port_file.exists()
        with pytest.raises(ChatbotError) as err:  # retried (UNAVAILABLE) then reported
            client.list_models()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details
        release.set()
        st.wait_serving()
        assert client.health() == "SERVING"
        assert client.health("chatforge.v1.Chatbot") == "SERVING"
        assert port_file.read_text().strip() == str(st.server.port)
        assert [m.name for m in client.list_models()] == ["echo", "other", "intents"]


def test_shutdown_sets_not_serving_before_stopping():
    with ServerThread(make_engine(), grace=0.2) as st:
        st.wait_serving()
        channel = grpc.insecure_channel(st.target)
        try:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="chatforge.v1.Chatbot"), timeout=WAIT
            )
            first = next(watch)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            st.request_shutdown()  # exactly what the SIGTERM handler calls
            second = next(watch)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            channel.close()
        st.join()
    assert st.server.engine is not None and st.server.engine._closed


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_stops_the_process_with_exit_code_0(tmp_path, sig):
    """SIGHUP drains like SIGTERM: its default action killed the server at once (no drain, no log line, every call
    in flight failed), e.g. when the terminal that started it closed."""
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "serving_fakes.py"), str(port_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the server process did not become ready in 60 s"
        port = proc.stdout.readline().strip()
        assert port.isdigit(), f"unexpected ready line {port!r}; stderr: {proc.stderr.read()}"
        with ChatbotClient(f"127.0.0.1:{port}", timeout=WAIT) as client:
            assert client.health("chatforge.v1.Chatbot") == "SERVING"
            assert client.reply("hello", max_new_tokens=2) == "Hello"
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        stderr = proc.stderr.read()
        assert rc == 0, stderr
        assert "shutting down" in stderr and "stopped" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        ("", {}, "text is empty"),
        ("x" * 201, {}, "allowed: at most 200"),
        ("hi", {"temperature": 0.0}, "options.temperature=0.0 is out of range; allowed: a number in (0, 10]"),
        ("hi", {"top_p": 1.5}, "options.top_p=1.5 is out of range"),
        ("hi", {"max_new_tokens": 0}, "allowed: an integer in [1, 1024]"),
    ],
)
def test_invalid_argument_then_server_still_serves(server, text, options, expected):
    with ChatbotClient(server.target, timeout=WAIT) as client:
        with pytest.raises(ChatbotError) as err:
            client.reply(text, **options)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in err.value.details
        assert client.reply("hello", max_new_tokens=3) == "Hello there"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # Checked as sent: not rounded to 6 decimals first (1e-30 used to be refused as "temperature=0.0").
        ({"temperature": -1e-30}, "options.temperature=-1e-30 is out of range; allowed: a number in (0, 10]"),
        ({"temperature": 10.5}, "options.temperature=10.5 is out of range; allowed: a number in (0, 10]"),
        ({"top_p": 1.1}, "options.top_p=1.1 is out of range; allowed: a number in (0, 1] (1 disables top-p)"),
        ({"repetition_penalty": 0.9}, "options.repetition_penalty=0.9 is out of range; allowed: a number in [1, 10]"),
        ({"top_k": 100_001}, "options.top_k=100001 is out of range; allowed: an integer in [0, 100000] (0 disables top-k)"),
        ({"no_repeat_ngram_size": 17},
         "options.no_repeat_ngram_size=17 is out of range; allowed: an integer in [0, 16] (0 disables it)"),
        ({"frequency_penalty": 2.1},
         "options.frequency_penalty=2.1 is out of range; allowed: a number in [-2, 2] (0 disables it)"),
        ({"presence_penalty": -2.5},
         "options.presence_penalty=-2.5 is out of range; allowed: a number in [-2, 2] (0 disables it)"),
    ],
)
def test_options_are_checked_as_sent_and_the_range_is_the_protos(server, options, expected):
    with ChatbotClient(server.target, timeout=WAIT) as client:
        with pytest.raises(ChatbotError) as err:
            client.reply("hi", **options)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details == expected


@pytest.mark.parametrize("options", [{"temperature": 1e-30, "do_sample": True}, {"top_p": 1e-30, "do_sample": True},
                                     {"temperature": 10.0}, {"repetition_penalty": 10.0},
                                     {"no_repeat_ngram_size": 16}, {"frequency_penalty": -2.0},
                                     {"presence_penalty": 0.7, "frequency_penalty": 2.0}])
def test_options_inside_the_documented_range_are_accepted(options):
    engine = make_engine()
    with ServerThread(engine) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        assert client.reply("hello", max_new_tokens=3, **options) == "Hello there"
        [(_, sent)] = engine.generators["echo"].calls
        for name, value in options.items():
            assert getattr(sent, name) == value  # the value the caller wrote, not a rounded one


def test_unknown_model_is_not_found(server):
    with ChatbotClient(server.target, timeout=WAIT) as client:
        with pytest.raises(ChatbotError) as err:
            client.reply("hi", model="nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert "available: echo, other" in err.value.details
        with pytest.raises(ChatbotError) as err:
            client.classify("hi", model="nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_classify_without_classifier_is_unimplemented():
    with ServerThread(Engine({"echo": FakeGenerator()}, {})) as st, ChatbotClient(st.target) as client:
        st.wait_serving()
        with pytest.raises(ChatbotError) as err:
            client.classify("hello")
        assert err.value.code == grpc.StatusCode.UNIMPLEMENTED
        assert err.value.details == "Classify is not available: this server hosts no classification model"


def test_classify_and_list_models(server):
    with ChatbotClient(server.target, timeout=WAIT) as client:
        pred = client.classify("bye now")
        assert (pred.label, pred.score, pred.scores["greet"]) == ("bye", 0.8, 0.1)
        models = {m.name: m for m in client.list_models()}
        assert models["echo"].is_default and not models["other"].is_default
        assert models["intents"].task == "classification"
        assert models["echo"].metadata == {"seed": "7"}


def test_model_error_is_internal_without_leaking_details(caplog):
    with ServerThread(Engine({"bad": FailingGenerator()}, {})) as st, ChatbotClient(st.target) as client:
        st.wait_serving()
        with caplog.at_level(logging.INFO), pytest.raises(ChatbotError) as err:
            list(client.reply_stream("hi"))
        assert err.value.code == grpc.StatusCode.INTERNAL
        assert FailingGenerator.SECRET not in err.value.details
        assert err.value.request_id in err.value.details  # so an operator can find the traceback
        assert client.health() == "SERVING"
    assert any(FailingGenerator.SECRET in (r.exc_text or "") for r in caplog.records)


def test_client_cancel_stops_the_model_worker():
    gen = BlockingGenerator()
    engine = Engine({"block": gen}, {})
    with ServerThread(engine) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        stream = client.reply_stream("hi", max_new_tokens=1000)
        assert next(stream).text == "first"
        stream.close()  # cancels the RPC
        gen.release.set()  # let the model run; only the engine's stop flag can end it now
        assert gen.closed.wait(WAIT), "the model kept running after the client cancelled"
        assert engine.wait_idle(WAIT)
        assert engine.cancelled == 1 and engine.completed == 0
        assert gen.produced < BlockingGenerator.LIMIT
        assert client.health() == "SERVING"


def test_request_id_is_echoed_and_logged(server, caplog):
    with caplog.at_level(logging.INFO, logger="chatforge.serving.interceptors"):
        with ChatbotClient(server.target, timeout=WAIT) as client:
            chunks = list(client.reply_stream("hello", request_id="req-abc.123", max_new_tokens=2))
            assert client.last_request_id == "req-abc.123"
            assert chunks[-1].request_id == "req-abc.123"
            client.health()
            generated = client.last_request_id
            assert generated and generated != "req-abc.123"
            with pytest.raises(ValueError, match="request_id"):  # the client refuses what the server would replace
                client.health(request_id="bad id with spaces")
        with grpc.insecure_channel(server.target) as channel:  # another client's: not echoed into logs, replaced
            _, call = health_pb2_grpc.HealthStub(channel).Check.with_call(
                health_pb2.HealthCheckRequest(), timeout=WAIT, metadata=(("x-request-id", "bad id with spaces"),))
            assert dict(call.trailing_metadata())["x-request-id"] not in ("", "bad id with spaces")
        # The log line is written when the call finishes, which may be just after the client saw it.
        server.run(_noop())
    records = [r for r in caplog.records if getattr(r, "request_id", None) == "req-abc.123"]
    assert records, "no log record carries the request id"
    rec = records[-1]
    assert rec.rpc == "/chatforge.v1.Chatbot/Reply" and rec.grpc_code == "OK"
    assert rec.latency_ms >= 0


async def _noop():
    return None


def test_official_health_stub_sees_serving(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service="chatforge.v1.Chatbot"), timeout=WAIT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_client_streams_a_reply_without_chatforge_stubs(server):
    from google.protobuf import message_factory
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"chatforge.v1.Chatbot", "grpc.health.v1.Health"} <= services
        assert any(s.startswith("grpc.reflection.") for s in services)
        pool = DescriptorPool(db)  # a private pool: nothing from chatforge.v1's generated modules
        method = pool.FindServiceByName("chatforge.v1.Chatbot").methods_by_name["Reply"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls(text="hello")
        request.options.max_new_tokens = 2
        call = channel.unary_stream(
            "/chatforge.v1.Chatbot/Reply",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        responses = list(call(request, timeout=WAIT))
    assert [r.delta.text for r in responses[:-1]] == ["Hel", "lo"]
    assert responses[-1].final.finish_reason == "length"
    assert responses[-1].final.completion_tokens == 2


def test_retry_on_unavailable_is_transparent():
    class FlakyClassifier(FakeClassifier):
        def __init__(self):
            super().__init__()
            self.attempts = 0

        def classify(self, texts):
            self.attempts += 1
            if self.attempts == 1:
                raise EngineUnavailableError("overloaded, try again")
            return super().classify(texts)

    clf = FlakyClassifier()
    with ServerThread(Engine({}, {"flaky": clf})) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        assert client.classify("hello").label == "greet"
    assert clf.attempts == 2


def test_binding_a_taken_port_fails_loudly(server):
    from chatforge.serving.server import ChatbotServer

    async def start_second():
        second = ChatbotServer(make_engine(), "127.0.0.1", server.server.port)
        await second.start()

    with pytest.raises(OSError, match="cannot bind"):
        server.run(start_second())


def test_loader_failure_shuts_the_server_down_with_the_error():
    def broken_loader():
        raise FileNotFoundError("bundle /x has no weights.safetensors")

    with ServerThread(broken_loader) as st:
        st.join()  # the server stops by itself
    assert isinstance(st._error, FileNotFoundError)
    assert st.server.engine is None


@pytest.mark.parametrize(("error", "traceback"), [
    (ValueError("policy retriever 'intent' is a classification model"), False),  # configuration: its message
    (RuntimeError("CUDA driver exploded"), True),  # anything else: the traceback is the clue
])
def test_a_configuration_error_at_load_is_logged_without_a_traceback(error, traceback, caplog):
    import logging

    def broken_loader():
        raise error

    caplog.set_level(logging.ERROR, logger="chatforge.serving.server")
    with ServerThread(broken_loader) as st:
        st.join()
    [record] = [r for r in caplog.records if r.getMessage().startswith("loading the models failed")]
    assert (record.exc_info is not None) is traceback
    assert str(error) in record.getMessage() or traceback


def test_run_server_needs_bundles():
    from chatforge.serving.server import ServerConfig

    with pytest.raises(ValueError, match="no bundles"):
        ServerConfig(bundles={})


def test_server_config_is_checked_once_and_frozen(tmp_path):
    import dataclasses

    from chatforge.serving.server import ServerConfig

    with pytest.raises(ValueError, match="bundles or a model directory, not both"):
        ServerConfig(bundles={"chat": str(tmp_path)}, model_dir=tmp_path)
    with pytest.raises(ValueError, match="TLS needs both a certificate and its key"):
        ServerConfig(bundles={"chat": str(tmp_path)}, tls_cert=tmp_path / "cert.pem")
    with pytest.raises(ValueError, match="precision"):
        ServerConfig(bundles={"chat": str(tmp_path)}, precision="fp16")
    config = ServerConfig(bundles={"chat": tmp_path}, port_file=str(tmp_path / "port"), max_running=3)
    assert config.port_file == tmp_path / "port" and config.bundles == {"chat": str(tmp_path)}
    assert config.engine_kwargs()["max_running"] == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.bundles["other"] = "x"  # type: ignore[index]


@pytest.mark.parametrize(("method", "message"), [("Classify", "chatforge.v1.ClassifyRequest"),
                                                 ("Reply", "chatforge.v1.ReplyRequest")])
def test_malformed_request_bytes_are_invalid_argument_warned_and_counted(caplog, method, message):
    from chatforge.serving.metrics import ServingMetrics

    metrics = ServingMetrics(process_metrics=False)
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, with a length past the end
    with ServerThread(make_engine(), metrics=metrics) as st, grpc.insecure_channel(st.target) as channel:
        st.wait_serving()
        path = f"/chatforge.v1.Chatbot/{method}"
        call = (channel.unary_unary if method == "Classify" else channel.unary_stream)(path)  # raw bytes
        caplog.set_level(logging.DEBUG)
        with pytest.raises(grpc.RpcError) as err:
            result = call(garbage, timeout=WAIT)
            if method == "Reply":
                list(result)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == f"request is not a valid {message}"
        assert metrics.value("chatforge_requests_total", {"rpc": method, "model": "",
                                                          "status": "INVALID_ARGUMENT"}) == 1
        # The server keeps serving.
        with ChatbotClient(st.target, timeout=WAIT) as client:
            assert client.classify("hello").label == "greet"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "malformed request" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_reply_request_session_id_is_stored_and_logged_without_any_header(tmp_path, caplog):
    from chatforge.serving.store import ConversationStore
    from chatforge.v1 import chatbot_pb2 as pb
    from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

    store = ConversationStore(f"sqlite:///{tmp_path / 'turns.db'}")
    caplog.set_level(logging.INFO, logger="chatforge.serving.interceptors")
    with ServerThread(make_engine(), store=store) as st, grpc.insecure_channel(st.target) as channel:
        st.wait_serving()
        stub = pb_grpc.ChatbotStub(channel)  # the plain generated stub: the message is the API
        opts = pb.GenerationOptions(max_new_tokens=2)
        for i in range(3):  # two conversations, interleaved
            for sid in ("alice", "bob"):
                list(stub.Reply(pb.ReplyRequest(text=f"{sid} {i}", session_id=sid, options=opts), timeout=WAIT))
        # The header stays a fallback when the field is empty; the field wins over the header.
        list(stub.Reply(pb.ReplyRequest(text="carol 0", options=opts), timeout=WAIT,
                        metadata=(("x-session-id", "carol"),)))
        list(stub.Reply(pb.ReplyRequest(text="alice 3", session_id="alice", options=opts), timeout=WAIT,
                        metadata=(("x-session-id", "mallory"),)))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Reply(pb.ReplyRequest(text="x", session_id="s" * 129, options=opts), timeout=WAIT))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "session_id is 129 characters long; allowed: at most 128"
    assert [r["user_text"] for r in store.session("alice")] == ["alice 0", "alice 1", "alice 2", "alice 3"]
    assert [r["user_text"] for r in store.session("bob")] == ["bob 0", "bob 1", "bob 2"]
    assert [r["user_text"] for r in store.session("carol")] == ["carol 0"]
    assert store.session("mallory") == []
    logged = [r.session_id for r in caplog.records if getattr(r, "rpc", "") == "/chatforge.v1.Chatbot/Reply"]
    assert logged[:8] == ["alice", "bob"] * 3 + ["carol", "alice"]
    store.close()
