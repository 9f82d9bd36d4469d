"""Behind the shipped HAProxy's HTTP/2 backend, the server's per-connection stream bound costs no call.

The gRPC server tells each connection how many streams it may hold open (SETTINGS_MAX_CONCURRENT_STREAMS,
``--max-concurrent-streams``; tests/serving/test_server_streams_bound.py). Behind HAProxy in HTTP/2 mode
(deploy/haproxy/haproxy.cfg, frontend ``grpc_h2``, backend ``chatforge_h2``) many clients' calls share few
backend connections, so the bound applies to HAProxy's connections. These tests run the real haproxy binary with
the shipped file unchanged (only addresses and ports from the environment, all on 127.0.0.1; both of its servers,
``a`` and ``b``, point at the one in-process server) in front of a server with ``max_concurrent_streams=2``, open
calls at once through one client connection, each held by the model until the test lets it go, and check that
the server has all of them under way at the same time and that every one succeeds.

Measured with HAProxy 2.6.12 (Debian 12): HAProxy honours the server's bound and opens another connection to the
server for the calls a connection cannot take (6 calls: 4 connections, 2 per server line; 60 calls: 30 to 56),
rather than queueing them or failing them. In a burst it sometimes puts a stream on a connection that has no room
for it yet; the server refuses that stream (nothing was processed) and the backend's ``retry-on ...
empty-response`` re-sends it on another connection (HAProxy's stats count it in ``wretr``: 0 to 30 of 60 per
burst; no call failed in about 40 bursts). Without ``empty-response`` those calls failed UNAVAILABLE
("RST_STREAM with error code 7") at the client: 1 to 18 of the 60 calls in 5 of 8 bursts.

Not a test, measured (2026-12-07): 240 calls at once on one client channel. HAProxy's frontend lets a client
connection hold 100 streams (``tune.h2.max-concurrent-streams``), so the server had 100 under way over 50 connections
and the client's channel queued the rest; on a quiet machine 0 of 240 failed in three bursts (0 to 2 re-sent), but in a
CI run on the loaded 2-core machine 111 of 240 failed UNAVAILABLE (REFUSED_STREAM) after 361 re-sends: as streams
ended and the queued ones poured in, HAProxy kept sending streams to connections the server had not yet freed, and
its 3 retries ran out. That is the bound of 2 streams per connection this file sets on purpose; the served default
(``--max-running + --max-queued + 16``) is above what a replica can take in at once anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import psutil
import pytest
from tests.deploy_helpers import say, wait_for
from tests.scenarios.test_http_browser_haproxy import Balancer, _haproxy
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.decoding import GenerationOptions
from chatforge.inference import TokenDelta
from chatforge.serving.engine import Engine
from chatforge.v1 import chatbot_pb2, chatbot_pb2_grpc

pytestmark = pytest.mark.slow

STREAMS_BOUND = 2  # per HTTP/2 connection, so N calls at once need at least N / 2 of HAProxy's connections


class HeldGenerator(FakeGenerator):
    """Yields a first token, then holds the call until ``release`` is set; counts the calls under way."""

    def __init__(self) -> None:
        super().__init__(name="chat")
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.in_flight = 0

    def stream(self, text: str, options: GenerationOptions) -> Iterator[TokenDelta]:
        with self._lock:
            self.in_flight += 1
        try:
            yield TokenDelta(token_id=100, text="held")
            if not self.release.wait(WAIT * 3):
                raise RuntimeError("the test never released this call")
            yield TokenDelta(token_id=101, text=" done")
        finally:
            with self._lock:
                self.in_flight -= 1


def _connections_to(port: int) -> int:
    """Established TCP connections accepted on ``port``: HAProxy's connections to the in-process gRPC server."""
    return sum(1 for c in psutil.net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)


@dataclass
class Burst:
    calls: int
    in_flight: int = 0  # calls the server had under way at once, before the test released them
    connections: int = 0  # HAProxy's connections to the server meanwhile
    retries: int = 0  # HAProxy's re-sent requests (stats: wretr)
    replies: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    log: str = ""

    def __str__(self) -> str:
        return (f"{self.calls} calls through HAProxy's chatforge_h2 to a server with max_concurrent_streams="
                f"{STREAMS_BOUND}: {self.in_flight} under way at once over {self.connections} connections, "
                f"{self.retries} re-sent by HAProxy, {len(self.errors)} failed {self.errors[:3]}")


def _burst(tmp_path, calls: int, under_way: int | None = None) -> Burst:
    """Open ``calls`` Reply calls at once through HAProxy's HTTP/2 frontend (one client connection), wait (bounded)
    until the server has ``under_way`` of them (default: all) under way or one failed, then release them and collect
    the replies."""
    under_way = calls if under_way is None else under_way
    exe = _haproxy()
    gen = HeldGenerator()
    out = Burst(calls)
    engine = Engine({"chat": gen}, {"intents": FakeClassifier()}, max_running=calls, max_queued=8)
    with ServerThread(engine, metrics_port=0, max_concurrent_streams=STREAMS_BOUND) as st:
        st.wait_serving()
        lb = Balancer(exe, 0, st.server.metrics_http.port, tmp_path / "haproxy.log", grpc_port=st.server.port)
        threads: list[threading.Thread] = []
        try:
            def h2_servers_up() -> bool:
                assert lb.proc.poll() is None, f"haproxy exited ({lb.proc.returncode}):\n{lb.log_tail()}"
                rows = lb.stats_rows("chatforge_h2")
                return all(rows.get(s, {}).get("status") == "UP" for s in ("a", "b"))

            wait_for(h2_servers_up, 15, "HAProxy marks both chatforge_h2 servers UP")
            with grpc.insecure_channel(f"127.0.0.1:{lb.env['CHATFORGE_LB_H2_PORT']}") as channel:
                # Connected first, so that the calls reach HAProxy together, not as the connection comes up.
                grpc.channel_ready_future(channel).result(timeout=WAIT)
                stub = chatbot_pb2_grpc.ChatbotStub(channel)
                request = chatbot_pb2.ReplyRequest(text="hello", model="chat",
                                                   options=chatbot_pb2.GenerationOptions(max_new_tokens=2))

                def call() -> None:
                    try:
                        chunks = stub.Reply(request, timeout=WAIT * 4)
                        out.replies.append("".join(c.delta.text for c in chunks if c.HasField("delta")))
                    except grpc.RpcError as e:
                        out.errors.append(f"{e.code().name}: {e.details()}")

                threads = [threading.Thread(target=call, daemon=True) for _ in range(calls)]
                for t in threads:
                    t.start()
                try:
                    wait_for(lambda: gen.in_flight == under_way or bool(out.errors), WAIT * 2,
                             f"the server has {under_way} of the {calls} calls under way at once")
                except TimeoutError:
                    pass  # reported below: how many it had
                out.in_flight, out.connections = gen.in_flight, _connections_to(st.server.port)
                gen.release.set()
                for t in threads:
                    t.join(WAIT * 4)
                out.retries = int(lb.stats_rows("chatforge_h2").get("BACKEND", {}).get("wretr") or 0)
        finally:
            gen.release.set()
            lb.stop()
            out.log = lb.log_tail()
    assert not any(t.is_alive() for t in threads), f"a call did not finish: {out}"
    return out


def test_haproxy_opens_more_connections_when_the_servers_stream_bound_is_reached(tmp_path, pytestconfig):
    """6 calls, 2 streams per connection: HAProxy must open more connections, not queue the calls behind the bound
    (the server would see 4 at most: 2 server lines x 2 streams) nor fail them."""
    burst = _burst(tmp_path, 6)
    say(pytestconfig, f"\n{burst}")
    detail = f"{burst}\nhaproxy log:\n{burst.log}"
    assert burst.in_flight == 6, detail
    assert burst.connections >= 6 // STREAMS_BOUND, detail
    assert burst.errors == [] and burst.replies == ["held done"] * 6, detail


def test_a_burst_past_the_stream_bound_costs_no_call(tmp_path, pytestconfig):
    """60 calls at once: a few streams land on a connection without room yet and the server refuses them; the
    shipped backend's `retry-on ... empty-response` re-sends them (without it, some of these calls failed)."""
    burst = _burst(tmp_path, 60)
    say(pytestconfig, f"\n{burst}")
    detail = f"{burst}\nhaproxy log:\n{burst.log}"
    assert burst.errors == [], detail
    assert burst.in_flight == 60 and burst.connections >= 60 // STREAMS_BOUND, detail
    assert burst.replies == ["held done"] * 60, detail

