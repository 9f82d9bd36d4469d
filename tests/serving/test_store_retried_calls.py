"""A call sent again under its request id (a client's retry, a caller re-sending) is stored once.

Before, a Classify whose first attempt was stored and then failed UNAVAILABLE (the answer lost on the way back), and
was retried by the client's channel under the same x-request-id, left two rows; so did any Reply or Classify a caller
sent twice with its id. The store now looks each batch's request ids up in the batch's transaction.
"""

from __future__ import annotations

import sqlite3

import grpc
import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.client import ChatbotClient
from chatforge.serving.service import ChatbotServicer, ModelsLoadingError
from chatforge.serving.store import ConversationStore, Turn
from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc as pb_grpc


def _rows(url: str) -> list[dict]:
    with ConversationStore(url) as store:
        return list(store.iter_rows())


def test_a_classify_retried_after_its_answer_was_lost_is_stored_once(tmp_path, monkeypatch):
    original, attempts = ChatbotServicer.Classify, []

    async def answer_lost_once(self, request, context):
        response = await original(self, request, context)  # the turn is recorded here
        attempts.append(request.text)
        if len(attempts) == 1:  # UNAVAILABLE: the client's channel sends the call again, same x-request-id
            raise ModelsLoadingError("the answer was lost on the way back")
        return response

    monkeypatch.setattr(ChatbotServicer, "Classify", answer_lost_once)
    url = f"sqlite:///{tmp_path / 'turns.db'}"
    store = ConversationStore(url)
    with ServerThread(make_engine(), store=store) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as client:
            assert client.classify("what is my balance").label
            rid = client.last_request_id
    store.close()
    assert attempts == ["what is my balance"] * 2  # the server did answer twice
    rows = _rows(url)
    assert [(r["request_id"], r["user_text"]) for r in rows] == [(rid, "what is my balance")]
    assert store.merged == 1


def test_a_call_re_sent_under_its_request_id_is_stored_once_and_other_calls_under_that_id_are_not(tmp_path):
    url = f"sqlite:///{tmp_path / 'turns.db'}"
    store = ConversationStore(url)
    with ServerThread(make_engine(), store=store) as st, grpc.insecure_channel(st.target) as channel:
        st.wait_serving()
        stub = pb_grpc.ChatbotStub(channel)
        md = (("x-request-id", "upstream-7"),)
        opts = pb.GenerationOptions(max_new_tokens=2)
        for _ in range(2):  # each call sent twice by its caller
            stub.Classify(pb.ClassifyRequest(text="hello"), timeout=WAIT, metadata=md)
            list(stub.Reply(pb.ReplyRequest(text="hello", session_id="s1", options=opts), timeout=WAIT, metadata=md))
        # The same id fixed for other calls (an upstream trace id): other messages, another session: new turns.
        list(stub.Reply(pb.ReplyRequest(text="bye", session_id="s1", options=opts), timeout=WAIT, metadata=md))
        list(stub.Reply(pb.ReplyRequest(text="hello", session_id="s2", options=opts), timeout=WAIT, metadata=md))
    store.close()
    rows = _rows(url)
    assert [(r["user_text"], r["session_id"], r["reply"] is None) for r in rows] == [
        ("hello", None, True), ("hello", "s1", False), ("bye", "s1", False), ("hello", "s2", False)]
    assert {r["request_id"] for r in rows} == {"upstream-7"}


@pytest.mark.parametrize("flush_between", [False, True], ids=["one batch", "two batches"])
def test_the_later_attempt_is_kept_in_the_first_attempts_row(tmp_path, flush_between):
    url = f"sqlite:///{tmp_path / 'turns.db'}"
    with ConversationStore(url) as store:
        store.record(Turn(request_id="r1", session_id="s", user_text="hi", reply="first answer", latency_ms=5.0))
        if flush_between:
            assert store.flush(WAIT)
        store.record(Turn(request_id="r1", session_id="s", user_text="hi", reply="second answer", latency_ms=7.0))
        store.record(Turn(request_id=None, user_text="hi", reply="no id"))  # never merged
        store.record(Turn(request_id=None, user_text="hi", reply="no id"))
        assert store.flush(WAIT)
        rows = list(store.iter_rows())
        assert store.merged == 1 and store.written == 4
    assert [(r["id"], r["reply"], r["latency_ms"]) for r in rows] == [
        (1, "second answer", 7.0), (rows[1]["id"], "no id", None), (rows[2]["id"], "no id", None)]


def test_an_older_store_gets_the_request_id_index(tmp_path):
    path = tmp_path / "old.db"
    with ConversationStore(f"sqlite:///{path}"):
        pass
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX ix_turns_request_id")
    with ConversationStore(f"sqlite:///{path}"):
        pass
    with sqlite3.connect(path) as db:
        names = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "ix_turns_request_id" in names


def test_a_sqlite_store_holds_the_write_lock_from_its_retry_lookup_to_its_commit(tmp_path):
    """Two servers writing one SQLite file (two ``chatforge serve`` on one host, the default store path): the lookup
    of a batch's request ids must run under the database's write lock, or the other server can insert the same call
    between this one's lookup and its insert, and both rows stay. Before, Python's driver began the transaction only
    at the INSERT, so the lookup ran outside any transaction and another process could write right after it."""
    from sqlalchemy import event

    path = tmp_path / "turns.db"
    store = ConversationStore(f"sqlite:///{path}")
    probes: list[str] = []

    def after_lookup(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and "request_id IN" in statement:
            other = sqlite3.connect(path, timeout=0)  # another process, not willing to wait
            try:
                other.execute("BEGIN IMMEDIATE")  # could another writer start here?
                other.execute("ROLLBACK")
                probes.append("another writer could write between the lookup and the insert")
            except sqlite3.OperationalError as e:
                probes.append(str(e))
            finally:
                other.close()

    event.listen(store.engine, "after_cursor_execute", after_lookup)
    try:
        store.record(Turn(request_id="r1", session_id="s", user_text="hi", reply="an answer"))
        assert store.flush(WAIT)
        assert probes == ["database is locked"]
        store.record(Turn(request_id="r1", session_id="s", user_text="hi", reply="the retry's answer"))
        assert store.flush(WAIT) and store.merged == 1
    finally:
        store.close()
    assert [r["reply"] for r in _rows(f"sqlite:///{path}")] == ["the retry's answer"]
