"""Drain on SIGTERM: readiness flips at once, liveness stays up, new calls UNAVAILABLE,
in-flight streams finish, every acknowledged turn is in the store, /readyz follows."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request

import grpc
import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, GatedGenerator, ServerThread

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.serving.engine import Engine
from chatforge.serving.metrics import ServingMetrics
from chatforge.serving.server import ChatbotServer
from chatforge.serving.store import ConversationStore


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_drain_with_8_open_streams_loses_none(tmp_path):
    gate = threading.Semaphore(0)
    engine = Engine({"gated": GatedGenerator(gate=gate)}, {"intents": FakeClassifier()}, max_running=8)
    store = ConversationStore(f"sqlite:///{tmp_path / 'turns.db'}")
    metrics = ServingMetrics(process_metrics=False)
    st = ServerThread(engine, grace=WAIT, store=store, metrics=metrics, metrics_port=0)
    with st, ChatbotClient(st.target, timeout=WAIT, options=[("grpc.enable_retries", 0)]) as client:
        st.wait_serving()
        readyz = f"{st.server.metrics_http.url}/readyz"
        assert _http_status(readyz) == 200
        assert client.classify("hello").label == "greet"  # one turn before the drain
        results: dict[int, list] = {}

        def consume(i: int) -> None:
            results[i] = list(client.reply_stream(f"msg {i}", session_id=f"s{i}", max_new_tokens=20))

        threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        # All 8 submitted; one released step lets the scheduler admit the late ones into the batch.
        assert engine.stats.wait_for(lambda s: s.waiting + s.running == 8, WAIT)
        if engine.stats.running < 8:
            gate.release()
        assert engine.stats.wait_for(lambda s: s.running == 8, WAIT)

        st.request_shutdown()  # exactly what the SIGTERM handler calls
        assert _wait_draining(st)
        # Readiness is off at once; liveness stays SERVING while streams finish.
        assert client.health("chatforge.v1.Chatbot") == "NOT_SERVING"
        assert client.health() == "SERVING"
        assert _http_status(readyz) == 503
        assert _http_status(f"{st.server.metrics_http.url}/healthz") == 200
        with pytest.raises(ChatbotError) as err:  # new calls go elsewhere
            client.reply("late", max_new_tokens=1)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details

        gate.release(40)  # enough steps for every stream to reach max_new_tokens=20
        for t in threads:
            t.join(WAIT)
        st.join()
    assert sorted(results) == list(range(8))
    for chunks in results.values():
        assert [c.token_id for c in chunks[:-1]] == list(range(10, 30))
        assert chunks[-1].finish_reason == "length"
    # The store was flushed during the drain: 8 replies + 1 classification.
    rows = list(store.iter_rows())
    assert len(rows) == 9
    assert sorted(r["session_id"] for r in rows if r["reply"]) == [f"s{i}" for i in range(8)]
    assert {r["reply"] for r in rows if r["reply"]} == {"".join(f"<{i}>" for i in range(10, 30))}
    store.close()


def _wait_draining(st) -> bool:
    async def check():
        # request_shutdown is scheduled on the loop; the drain flips the gate in its first steps.
        for _ in range(1000):
            if st.server.gate.draining:
                return True
            await asyncio.sleep(0)
        return False

    return st.run(check())


DRAIN_DELAY = 3.0


def test_drain_delay_keeps_serving_while_readiness_is_off(tmp_path):
    import time

    gate = threading.Semaphore(0)
    metrics = ServingMetrics(process_metrics=False)
    engine = Engine({"echo": FakeGenerator(), "gated": GatedGenerator(gate=gate)}, {"intents": FakeClassifier()})
    st = ServerThread(engine, grace=WAIT, drain_delay=DRAIN_DELAY, metrics=metrics, metrics_port=0)
    with st, ChatbotClient(st.target, timeout=WAIT, options=[("grpc.enable_retries", 0)]) as client:
        st.wait_serving()
        readyz = f"{st.server.metrics_http.url}/readyz"
        assert _http_status(readyz) == 200
        # One stream stays open across the drain (its steps wait for `gate`), so the server is
        # still up, in its grace period, when the delay ends.
        stream = client.reply_stream("long", model="gated", max_new_tokens=3)
        assert next(stream).token_id == 10  # the prefill's token; the decode steps wait for the gate
        flipped = time.monotonic()
        st.request_shutdown()
        assert _poll(lambda: not st.server.ready, WAIT)
        # Readiness is off at once (gRPC health and /readyz) ...
        assert client.health("chatforge.v1.Chatbot") == "NOT_SERVING"
        assert _http_status(readyz) == 503
        # ... while the listener still accepts and serves new calls of every kind.
        assert not st.server.gate.draining
        assert client.classify("hello").label == "greet"
        assert client.reply("hello", model="echo", max_new_tokens=3) == "Hello there"
        assert sorted(m.name for m in client.list_models()) == ["echo", "gated", "intents"]
        assert time.monotonic() - flipped < DRAIN_DELAY, "the calls above took longer than the drain delay"
        # After the delay it refuses new calls (the balancer has moved the traffic by then) ...
        assert _poll(lambda: st.server.gate.draining, DRAIN_DELAY + WAIT)
        assert time.monotonic() - flipped >= DRAIN_DELAY
        with pytest.raises(ChatbotError) as err:
            client.classify("late")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details
        # ... and the stream in flight still finishes within the grace.
        gate.release(10)
        rest = list(stream)
        assert [c.token_id for c in rest[:-1]] == [11, 12] and rest[-1].finish_reason == "length"
        st.join()


def test_drain_delay_must_not_be_negative():
    with pytest.raises(ValueError, match=r"drain_delay=-1 is out of range; allowed: a number of seconds >= 0"):
        ChatbotServer(Engine({"echo": FakeGenerator()}, {}), drain_delay=-1)


def test_serve_passes_drain_delay_through(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from chatforge import cli
    from chatforge.serving import server

    seen = {}
    monkeypatch.setattr(server, "run_server", lambda config, **kw: seen.update(drain_delay=config.drain_delay) or 0)
    (tmp_path / "bundle").mkdir()
    r = CliRunner().invoke(cli.app, ["serve", "--model", f"chat={tmp_path / 'bundle'}", "--drain-delay", "2.5"])
    assert r.exit_code == 0, r.output
    assert seen["drain_delay"] == 2.5
    r = CliRunner().invoke(cli.app, ["serve", "--model", f"chat={tmp_path / 'bundle'}"])
    assert seen["drain_delay"] == 5.0  # the default gives a balancer polling every second time to see it


def _poll(predicate, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # polling a flag with a deadline
    return True


# SIGTERM with streams still running when the grace runs out, repeated under CPU load: a failure
# seen in 20 % of drains escapes DRAIN_RUNS runs with probability 0.8**21 < 1 % (caught >= 99 %).
# The load is the runs themselves: DRAIN_PARALLEL server processes starting (torch import), streaming
# and draining at once oversubscribe the cores (a separate CPU hog only made the test slower). The
# child's decoding steps take 0.2 s (tests/serving_fakes.py SlowStepTinySeq2Seq), as a real model's do
# under load: with the old drain its scheduler thread was then mid-step at exit and the process aborted.
DRAIN_RUNS = 21
DRAIN_PARALLEL = 4
LONG_STREAMS, SHORT_REPLIES = 8, 2


@pytest.mark.slow
def test_sigterm_with_streams_past_the_grace_always_exits_0(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(DRAIN_PARALLEL) as pool:
        reports = list(pool.map(lambda i: _drain_once(tmp_path / f"run{i}"), range(DRAIN_RUNS)))
    problems = [p for report in reports for p in report]
    assert not problems, f"{sum(1 for r in reports if r)} of {DRAIN_RUNS} drains went wrong: {problems[:5]}"


def _drain_once(folder) -> list[str]:
    """One SIGTERM drain of a tiny real model with 8 streams running; the problems found (none = ok)."""
    import select
    import signal
    import sqlite3
    import subprocess
    import sys

    from tests.serving_fakes import TESTS_DIR

    folder.mkdir()
    port_file, db = folder / "port", folder / "turns.db"
    proc = subprocess.Popen([sys.executable, str(TESTS_DIR / "serving_fakes.py"), str(port_file), "drain",
                             f"sqlite:///{db}", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes: dict[str, tuple] = {}
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the server did not become ready in 60 s"
        port = proc.stdout.readline().strip()
        assert port.isdigit(), f"ready line {port!r}"
        with ChatbotClient(f"127.0.0.1:{port}", timeout=60) as client:
            for i in range(SHORT_REPLIES):  # acknowledged before the drain: must be in the store
                client.reply(f"short {i}", session_id=f"short{i}", max_new_tokens=3)
                outcomes[f"short{i}"] = ("done",)
            first_tokens = threading.Semaphore(0)

            def consume(sid: str) -> None:
                n = 0
                try:
                    finish = None
                    for chunk in client.reply_stream("a long reply please", session_id=sid, max_new_tokens=1000):
                        n += 1
                        finish = chunk.finish_reason
                        if n == 1:
                            first_tokens.release()
                    outcomes[sid] = ("done", finish)
                except ChatbotError as e:
                    outcomes[sid] = (e.code.name, e.details)
                    if n == 0:
                        first_tokens.release()

            threads = [threading.Thread(target=consume, args=(f"long{i}",), daemon=True)
                       for i in range(LONG_STREAMS)]
            for t in threads:
                t.start()
            for _ in threads:  # every stream is running (has its first token) when SIGTERM comes
                assert first_tokens.acquire(timeout=60), "a stream never started"
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
            for t in threads:
                t.join(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    stderr = proc.stderr.read()
    problems = []
    if rc != 0:
        problems.append(f"exit status {rc}: {stderr[-300:]!r}")
    for sid, outcome in sorted(outcomes.items()):
        if outcome[0] != "done" and not (outcome[0] == "UNAVAILABLE" and "server shutting down" in outcome[1]):
            problems.append(f"stream {sid} ended with {outcome}")
    if len(outcomes) != LONG_STREAMS + SHORT_REPLIES:
        problems.append(f"only {len(outcomes)} calls ended")
    with sqlite3.connect(db) as conn:  # the store was flushed: every finished reply is in it
        stored = {row[0] for row in conn.execute("SELECT session_id FROM turns")}
    finished = {sid for sid, outcome in outcomes.items() if outcome[0] == "done"}
    if finished - stored:
        problems.append(f"finished replies missing from the store: {sorted(finished - stored)}")
    ours = [line for line in stderr.splitlines() if line.startswith("threads at exit:")]
    if ours != ["threads at exit: []"]:
        problems.append(f"threads still running at interpreter exit: {ours}")
    return problems
