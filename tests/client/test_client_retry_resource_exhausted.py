"""RESOURCE_EXHAUSTED is retried only when the server said its queue is full. gRPC also answers it for a request over
the server's message size limit, and the channel's retry policy, which cannot tell the two apart, sent such a request
5 times (a 100 KB Classify against a 4 KB limit uploaded about 500 KB before failing). Bytes are counted by a TCP
relay between client and server, not by timing."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.serving.engine import Engine, EngineOverloadedError

PAYLOAD = 100_000


class CountingRelay:
    """127.0.0.1 TCP relay to ``target``; ``upstream_bytes`` counts what the client sent through it."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.upstream_bytes = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=WAIT)
            for src, dst, counted in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pipe, args=(src, dst, counted), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        src.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                if counted:
                    with self._lock:
                        self.upstream_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(WAIT)


def test_a_request_over_the_size_limit_is_sent_once():
    engine = Engine({"echo": FakeGenerator()}, {"intents": FakeClassifier()})
    with ServerThread(engine, max_message_bytes=4096) as st:
        st.wait_serving()
        relay = CountingRelay(st.target)
        try:
            with ChatbotClient(relay.address, timeout=WAIT) as client:
                assert client.classify("bye").label == "bye"  # the channel is up; what that sent is counted too
                before = relay.upstream_bytes
                with pytest.raises(ChatbotError) as err:
                    client.classify("x" * PAYLOAD)
                assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                sent = relay.upstream_bytes - before
                assert client.classify("bye").label == "bye"  # and the client goes on
        finally:
            relay.close()
    assert sent < 2 * PAYLOAD, f"{sent} bytes sent for one {PAYLOAD}-byte request: it was retried"


def test_a_full_queue_the_server_reports_is_retried():
    engine = Engine({"echo": FakeGenerator()}, {"intents": FakeClassifier()})
    calls = []
    classify = engine.classify_with_model

    async def overloaded_once(*args, **kw):
        calls.append(args)
        if len(calls) == 1:
            raise EngineOverloadedError("overloaded: 1 running and 0 queued")
        return await classify(*args, **kw)

    engine.classify_with_model = overloaded_once
    with ServerThread(engine) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as client:
            assert client.classify("bye").label == "bye"
    assert len(calls) == 2  # the overloaded attempt, then the one that was answered
