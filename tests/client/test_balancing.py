"""ChatbotClient across replicas: round_robin, client-side health checking (healthCheckConfig)
in grpcio, transparent retries, and no retry of a stream after its first token."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.inference import TokenDelta
from chatforge.serving.engine import Engine, EngineUnavailableError
from chatforge.v1 import chatbot_pb2 as pb


def _replica(name: str):
    return ServerThread(Engine({"echo": FakeGenerator()}, {name: FakeClassifier(name)}))


def test_round_robin_skips_a_replica_whose_readiness_is_not_serving():
    with _replica("a") as a, _replica("b") as b:
        a.wait_serving()
        b.wait_serving()
        target = f"ipv4:127.0.0.1:{a.server.port},127.0.0.1:{b.server.port}"
        with ChatbotClient(target, timeout=WAIT) as client:
            assert client.health_check
            client.wait_for_ready(WAIT)
            seen = {_answered_by(client) for _ in range(20)}
            assert seen == {"a", "b"}  # round_robin uses both

            a.run(a.server.health.set("chatforge.v1.Chatbot", health_pb2.HealthCheckResponse.NOT_SERVING))
            # grpc-core's health watch pushes the change; bounded: stop once b served 10 in a row.
            streak = 0
            for _ in range(500):
                streak = streak + 1 if _answered_by(client) == "b" else 0
                if streak == 10:
                    break
            assert streak == 10, "the client kept sending to the NOT_SERVING replica"
            assert {_answered_by(client) for _ in range(30)} == {"b"}

            a.run(a.server.health.set("chatforge.v1.Chatbot", health_pb2.HealthCheckResponse.SERVING))
            for _ in range(500):
                if _answered_by(client) == "a":
                    break
            else:
                pytest.fail("the client never went back to the replica that became SERVING")


def _answered_by(client) -> str:
    # Classify answers with the replica's classifier name ("a" or "b").
    response = client._stub.Classify(pb.ClassifyRequest(text="hello"), timeout=WAIT)
    return response.model


class FailAfterFirstToken(FakeGenerator):
    def __init__(self):
        super().__init__("flaky")
        self.attempts = 0

    def stream(self, text, options):
        self.attempts += 1
        yield TokenDelta(token_id=100, text="partial")
        raise EngineUnavailableError("replica went away mid-stream")


class FailBeforeFirstToken(FakeGenerator):
    def __init__(self):
        super().__init__("early")
        self.attempts = 0

    def stream(self, text, options):
        self.attempts += 1
        if self.attempts == 1:
            raise EngineUnavailableError("not yet")
        yield from super().stream(text, options)


def test_stream_is_retried_before_its_first_token_never_after():
    late, early = FailAfterFirstToken(), FailBeforeFirstToken()
    with ServerThread(Engine({"flaky": late, "early": early}, {})) as st, \
            ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        # Before the first token: retried transparently, the caller sees one clean reply.
        assert client.reply("hi", model="early") == "Hello there!"
        assert early.attempts == 2
        # After the first token the call is committed: the error reaches the caller, no retry
        # (a retry would duplicate or splice tokens).
        chunks = []
        with pytest.raises(ChatbotError) as err:
            for c in client.reply_stream("hi", model="flaky"):
                chunks.append(c)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert [c.text for c in chunks] == ["partial"]
        assert late.attempts == 1


def test_an_unavailable_the_server_answered_is_not_sent_again_by_the_client():
    # The channel's retry policy owns server-answered UNAVAILABLE (off here); the client's own
    # retry is for broken connections only, so attempts are not multiplied.
    class Unavailable(FakeClassifier):
        attempts = 0

        def classify(self, texts):
            Unavailable.attempts += 1
            raise EngineUnavailableError("still warming up")

    with ServerThread(Engine({}, {"u": Unavailable()})) as st, \
            ChatbotClient(st.target, timeout=WAIT, options=[("grpc.enable_retries", 0)]) as client:
        st.wait_serving()
        with pytest.raises(ChatbotError) as err:
            client.classify("hello")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and Unavailable.attempts == 1


def test_retries_of_a_dead_address_stay_within_the_deadline():
    import socket
    import time

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ChatbotClient(f"127.0.0.1:{port}", timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(ChatbotError) as err:
            client.classify("hello")
        elapsed = time.monotonic() - started
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert elapsed < 1.0 + 0.5  # the deadline covers every attempt, backoffs included


class _DropsFirstCalls:
    """A raw gRPC Chatbot server whose first ``drops`` calls of each method end CANCELLED with no chatforge
    trailers: what a client sees when a replica stops with its call accepted but unanswered (a drain's last
    moments on a connection that a TCP-mode balancer still pins to it). Later calls are answered."""

    def __init__(self, drops: int = 1, trailers: bool = False, port: int = 0):
        from concurrent import futures

        from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

        self.drops, self.trailers, self.calls = drops, trailers, {"classify": 0, "reply": 0}
        outer = self

        class Servicer(pb_grpc.ChatbotServicer):
            def Classify(self, request, context):
                outer.calls["classify"] += 1
                if outer.calls["classify"] <= outer.drops:
                    outer._drop(context)
                return pb.ClassifyResponse(label="greeting", model="m")

            def Reply(self, request, context):
                outer.calls["reply"] += 1
                if outer.calls["reply"] <= outer.drops:
                    outer._drop(context)
                yield pb.ReplyChunk(delta=pb.ReplyDelta(token_id=5, text="hi"))
                yield pb.ReplyChunk(final=pb.ReplyFinal(finish_reason="stop", model="m"))

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_ChatbotServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")

    def _drop(self, context):
        if self.trailers:  # a status a chatforge handler sent: its trailers carry the request id
            context.set_trailing_metadata((("x-request-id", "answered"),))
        context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(None)


def test_a_call_the_server_dropped_with_cancelled_is_sent_again():
    # Found by CI behind HAProxy in tcp mode: 1 of 1,200 calls failed CANCELLED during a drain, though the
    # drain itself was clean. Classify is idempotent and a Reply that sent nothing produced nothing, so both go
    # out again; on the old client both raised CANCELLED.
    with _DropsFirstCalls(drops=1) as srv, \
            ChatbotClient(f"127.0.0.1:{srv.port}", timeout=WAIT, options=[("grpc.enable_retries", 0)]) as client:
        assert client.classify("hello").label == "greeting"
        assert client.reply("hi") == "hi"
        assert srv.calls == {"classify": 2, "reply": 2}


def test_a_cancelled_status_a_chatforge_server_answered_is_not_sent_again():
    # With chatforge's trailers the status came from a handler, not from a process dropping the call: as for a
    # server-answered UNAVAILABLE, the client does not multiply attempts.
    with _DropsFirstCalls(drops=1, trailers=True) as srv, \
            ChatbotClient(f"127.0.0.1:{srv.port}", timeout=WAIT, options=[("grpc.enable_retries", 0)]) as client:
        with pytest.raises(ChatbotError) as err:
            client.classify("hello")
        assert err.value.code == grpc.StatusCode.CANCELLED and srv.calls["classify"] == 1


def test_a_call_sent_again_waits_for_the_channel_to_reconnect(monkeypatch):
    # Found by CI behind HAProxy in tcp mode: a killed replica's connections failed, the channel sat in
    # TRANSIENT_FAILURE for gRPC's reconnect backoff (about 1 s), and every re-send inside that window failed at once
    # ("failed to connect to all addresses"), though the balancer had a healthy replica. Here the server comes up
    # right after the first attempt failed; on the old client the re-sends (within 0.35 s) all failed UNAVAILABLE.
    import socket
    import threading

    with socket.socket() as s:  # a port with nothing listening yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first_failure = threading.Event()
    original = ChatbotClient._should_retry

    def noting(self, *args, **kwargs):
        first_failure.set()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ChatbotClient, "_should_retry", noting)
    result: dict = {}
    with ChatbotClient(f"127.0.0.1:{port}", timeout=WAIT, options=[("grpc.enable_retries", 0)]) as client:
        def call():
            try:
                result["label"] = client.classify("hello").label
            except ChatbotError as e:
                result["error"] = e

        caller = threading.Thread(target=call)
        caller.start()
        assert first_failure.wait(WAIT)
        with _DropsFirstCalls(drops=0, port=port) as srv:
            caller.join(WAIT)
            assert not caller.is_alive()
            assert result == {"label": "greeting"} and srv.calls["classify"] == 1
