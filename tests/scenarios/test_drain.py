"""Drain on SIGTERM: readiness flips at once, liveness stays up, new calls UNAVAILABLE,
in-flight streams finish, every acknowledged turn is in the store, /readyz follows."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request

import grpc
import pytest

from chatforge.serving.client import ChatbotClient, ChatbotError
from chatforge.serving.engine import Engine
from chatforge.serving.metrics import ServingMetrics
from chatforge.serving.store import ConversationStore
from tests.serving_fakes import WAIT, FakeClassifier, GatedGenerator, ServerThread


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
