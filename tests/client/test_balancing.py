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
