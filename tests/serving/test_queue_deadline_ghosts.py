"""A queued request whose caller went away (deadline passed, cancelled) no longer holds a queue place: it held one
until a running request finished, so while one long reply ran, callers whose deadlines had passed in the queue made
the model refuse new calls with RESOURCE_EXHAUSTED ("1 running and 2 queued") with nobody waiting, and the waiting
count (engine and metrics) reported callers that were gone."""

from __future__ import annotations

import threading

import grpc
import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, GatedGenerator, ServerThread

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.serving.engine import Engine
from chatforge.serving.metrics import ServingMetrics
from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

NO_RETRY = [("grpc.enable_retries", 0)]


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_caller_gone_from_the_queue_frees_its_place_at_once(how):
    gate = threading.Semaphore(0)
    metrics = ServingMetrics(process_metrics=False)
    engine = Engine({"echo": FakeGenerator(), "gated": GatedGenerator(gate=gate)}, {"intents": FakeClassifier()},
                    max_input_chars=200, max_new_tokens=50, max_running=1, max_queued=2, metrics=metrics)
    try:
        with ServerThread(engine) as st:
            st.wait_serving()
            with ChatbotClient(st.target, timeout=WAIT, options=NO_RETRY) as client, \
                    grpc.insecure_channel(st.target) as channel:
                stub = pb_grpc.ChatbotStub(channel)
                running = client.reply_stream("hi", model="gated", max_new_tokens=50)
                assert next(running).token_id == 10  # holds the only slot; its next step waits for the gate
                for _ in range(2):  # fill the queue with callers that then go away
                    if how == "deadline":
                        with ChatbotClient(st.target, timeout=0.5, options=NO_RETRY) as short:
                            with pytest.raises(ChatbotError) as err:
                                short.reply("hi", model="gated")
                            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                    else:
                        call = stub.Reply(pb.ReplyRequest(text="hi", model="gated"), timeout=WAIT)
                        assert engine.stats.wait_for(lambda s: s.waiting == 1, WAIT), engine.stats.snapshot()
                        call.cancel()
                    # Nobody waits: the place is free again (a bounded wait: until the server sees the caller leave;
                    # shorter than the gated step's own WAIT, whose failure would free the slot and the queue too)
                    assert engine.stats.wait_for(lambda s: s.waiting == 0, WAIT / 3), engine.stats.snapshot()
                assert metrics.value("chatforge_requests_waiting", {"model": "gated"}) == 0
                waiter = client.reply_stream("hi", model="gated", max_new_tokens=1)
                got: list = []
                t = threading.Thread(target=lambda: got.extend(waiter))
                t.start()  # queued behind the running reply, not refused
                assert engine.stats.wait_for(lambda s: s.waiting == 1, WAIT)
                gate.release(100)
                t.join(WAIT)
                assert [c.text for c in got if not c.is_final] == ["<10>"]
                running.close()
    finally:
        gate.release(1000)
