"""One HTTP/2 connection may hold at most ``max_concurrent_streams`` calls open at once.

grpc's default is unlimited: a single connection could open streams without end, each a call with its buffers and
a task on the server. The bound travels to the client in the server's SETTINGS frame. What happens beyond it, on a
real server on 127.0.0.1: a grpc client queues the extra calls on its own side (HTTP/2 semantics; they start when a
stream ends, or fail DEADLINE_EXCEEDED if their deadline passes first, without reaching the server), a client that
ignores the SETTINGS has each extra stream reset (RST_STREAM), and other connections are served all along.
"""

from __future__ import annotations

import socket
import struct
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.serving.metrics import ServingMetrics
from chatforge.serving.server import (
    STREAM_HEADROOM,
    ChatbotServer,
    ServerConfig,
    default_max_concurrent_streams,
)
from chatforge.v1 import chatbot_pb2, chatbot_pb2_grpc

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]


def test_the_bound_defaults_to_the_engines_capacity_plus_headroom():
    options = dict(ChatbotServer(make_engine(max_running=2, max_queued=3), "127.0.0.1", 0)._options)
    assert options["grpc.max_concurrent_streams"] == 2 + 3 + STREAM_HEADROOM
    assert dict(ChatbotServer(make_engine, "127.0.0.1", 0)._options)["grpc.max_concurrent_streams"] \
        == default_max_concurrent_streams() == 8 + 64 + STREAM_HEADROOM  # a loader: the engine's defaults
    assert dict(ChatbotServer(make_engine(), "127.0.0.1", 0, max_concurrent_streams=5)._options)[
        "grpc.max_concurrent_streams"] == 5
    assert ServerConfig(bundles={"chat": "b"}, max_running=4, max_queued=10).streams_bound == 4 + 10 + STREAM_HEADROOM
    assert ServerConfig(bundles={"chat": "b"}, max_concurrent_streams=7).streams_bound == 7


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_a_bound_out_of_range_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=rf"max_concurrent_streams={value!r} is out of range; allowed: an integer >= 1"):
        ChatbotServer(make_engine(), "127.0.0.1", 0, max_concurrent_streams=value)
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        ServerConfig(bundles={"chat": "b"}, max_concurrent_streams=value)


def test_the_cli_has_the_flag():
    from typer.testing import CliRunner

    from chatforge.cli.serve import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert "--max-concurrent-streams" in result.output


def _watch(channel):
    """A health Watch: a stream that stays open (its first message says SERVING) until cancelled."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=WAIT)
    assert next(call).status == health_pb2.HealthCheckResponse.SERVING
    return call


def test_a_grpc_client_queues_calls_beyond_the_bound_and_other_connections_are_served():
    metrics = ServingMetrics(process_metrics=False)
    with ServerThread(make_engine(), metrics=metrics, max_concurrent_streams=2) as st:
        st.wait_serving()
        with grpc.insecure_channel(st.target, options=OWN_CONNECTION) as busy, \
                grpc.insecure_channel(st.target, options=OWN_CONNECTION) as other:
            held = [_watch(busy), _watch(busy)]  # the connection's two streams
            stub = chatbot_pb2_grpc.ChatbotStub(busy)
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(chatbot_pb2.ClassifyRequest(text="hello"), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # It waited on the client: the server never saw it.
            assert metrics.value("chatforge_requests_total", {"rpc": "Classify", "model": "intents",
                                                              "status": "DEADLINE_EXCEEDED"}) is None
            # Another connection is served meanwhile.
            reply = chatbot_pb2_grpc.ChatbotStub(other).Classify(chatbot_pb2.ClassifyRequest(text="bye"), timeout=WAIT)
            assert reply.label == "bye"
            # A queued call starts as soon as one of the connection's streams ends.
            queued = stub.Classify.future(chatbot_pb2.ClassifyRequest(text="hello"), timeout=WAIT)
            held[0].cancel()
            assert queued.result(timeout=WAIT).label == "greet"
            held[1].cancel()


# ------------------------------------------------------------------ a client that ignores SETTINGS
# Just enough HTTP/2 (RFC 9113) and HPACK (RFC 7541, literal fields without indexing) to open streams at once.
DATA, HEADERS, RST_STREAM, SETTINGS = 0x0, 0x1, 0x3, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4
REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x7, 0xB
ACK = 0x1
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _watch_stream(stream: int, authority: str) -> bytes:
    fields = [(":method", "POST"), (":scheme", "http"), (":path", "/grpc.health.v1.Health/Watch"),
              (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers")]
    block = b"".join(_literal(k, v) for k, v in fields)
    empty_request = b"\x00\x00\x00\x00\x00"  # not compressed, 0 bytes: HealthCheckRequest(service="")
    return _frame(HEADERS, END_HEADERS, stream, block) + _frame(DATA, END_STREAM, stream, empty_request)


def _frames(sock: socket.socket, done, timeout: float):
    """Frames read from ``sock`` until ``done(frames)`` or ``timeout`` seconds."""
    frames, buffer = [], b""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while not done(frames) and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            length = int.from_bytes(buffer[:3], "big")
            frames.append((buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF, buffer[9:9 + length]))
            buffer = buffer[9 + length:]
    return frames


def _server_settings(frames) -> dict[int, int] | None:
    payload = next((p for kind, flags, _, p in frames if kind == SETTINGS and not flags & ACK), None)
    if payload is None:
        return None
    return {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
            for i in range(0, len(payload), 6)}


@pytest.mark.parametrize(("acknowledged", "code"), [(False, ENHANCE_YOUR_CALM), (True, REFUSED_STREAM)])
def test_streams_opened_past_the_bound_are_reset_and_the_server_keeps_serving(acknowledged, code):
    """A client that ignores the bound and opens five streams at once: the first two are served, each other one is
    reset: ENHANCE_YOUR_CALM (grpc clients: RESOURCE_EXHAUSTED) while the client has not acknowledged the server's
    SETTINGS, REFUSED_STREAM (nothing was processed; grpc clients retry it) once it has."""
    metrics = ServingMetrics(process_metrics=False)
    with ServerThread(make_engine(), metrics=metrics, max_concurrent_streams=2) as st:
        st.wait_serving()
        streams = [1, 3, 5, 7, 9]
        host, port = st.target.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(SETTINGS, 0, 0))
            frames = []
            if acknowledged:
                frames = _frames(sock, lambda f: _server_settings(f) is not None, WAIT)
                sock.sendall(_frame(SETTINGS, ACK, 0))
            sock.sendall(b"".join(_watch_stream(s, st.target) for s in streams))  # every stream at once

            def answered(frames):
                return {s for kind, _, s, _ in frames if kind in (HEADERS, RST_STREAM)} >= set(streams)

            frames += _frames(sock, lambda f: answered(frames + f), WAIT)
            assert _server_settings(frames)[SETTINGS_MAX_CONCURRENT_STREAMS] == 2
            reset = {s: int.from_bytes(p, "big") for kind, _, s, p in frames if kind == RST_STREAM}
            assert reset == {5: code, 7: code, 9: code}
            assert {s for kind, _, s, _ in frames if kind == HEADERS} == {1, 3}  # the first two are served
        with grpc.insecure_channel(st.target, options=OWN_CONNECTION) as channel:
            reply = chatbot_pb2_grpc.ChatbotStub(channel).Classify(chatbot_pb2.ClassifyRequest(text="bye"),
                                                                  timeout=WAIT)
            assert reply.label == "bye"
    # grpc refuses those streams before any handler lookup: nothing in this process sees them (docs/operations.md).
    assert metrics.value("chatforge_requests_unhandled_total", {"rpc": "Watch"}) is None
