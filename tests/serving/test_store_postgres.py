"""ConversationStore on a real PostgreSQL server (any SQLAlchemy URL, not only SQLite).

Runs when CHATFORGE_TEST_PG_URL names a reachable server, e.g. the throwaway one that
``tools/start_postgres.sh`` starts and prints; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from chatforge.serving.store import ConversationStore, Turn

PG_URL = os.environ.get("CHATFORGE_TEST_PG_URL", "")


@pytest.fixture(scope="module")
def pg_url() -> str:
    if not PG_URL:
        pytest.skip("no PostgreSQL server: set CHATFORGE_TEST_PG_URL "
                    "(e.g. export CHATFORGE_TEST_PG_URL=$(tools/start_postgres.sh))")
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install 'psycopg[binary]')")
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_URL, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as e:  # noqa: BLE001 - any failure to connect means "no server", with its reason
        pytest.skip(f"PostgreSQL at CHATFORGE_TEST_PG_URL is not reachable: {type(e).__name__}: {e}")
    finally:
        engine.dispose()
    return PG_URL


@pytest.fixture()
def store(pg_url):
    s = ConversationStore(pg_url, batch_size=16)
    yield s
    s.close()


def _turn(session: str, i: int, **kw) -> Turn:
    base = dict(session_id=session, request_id=f"{session}-{i}", model="chat", model_version="1",
                user_text=f"안녕하세요 {i}", reply=f"반가워요 {i}", intent="greeting", intent_score=0.75,
                ttft_ms=3.5, latency_ms=20.0 + i, status="OK")
    base.update(kw)
    return Turn(**base)


def test_turns_round_trip_through_postgres(store):
    session = uuid.uuid4().hex  # tables persist across runs: isolate by session
    for i in range(40):
        assert store.record(_turn(session, i))
    assert store.flush(timeout=10)
    rows = [r for r in store.iter_rows() if r["session_id"] == session]
    assert [r["request_id"] for r in rows] == [f"{session}-{i}" for i in range(40)]
    assert rows[3]["user_text"] == "안녕하세요 3" and rows[3]["intent_score"] == pytest.approx(0.75)
    assert rows[0]["created_at"].tzinfo is timezone.utc


def test_a_call_sent_again_is_one_row_on_postgres(store):
    session = uuid.uuid4().hex
    for reply, flush in (("first", True), ("second", False), ("third", True)):  # across batches and within one
        assert store.record(_turn(session, 0, reply=reply))
        if flush:
            assert store.flush(timeout=10)
    assert [r["reply"] for r in store.session(session)] == ["third"] and store.merged == 2


def test_concurrent_writers_and_close_keeps_every_turn(pg_url):
    session = uuid.uuid4().hex
    s = ConversationStore(pg_url, batch_size=8)

    def worker(t: int) -> None:
        for i in range(25):
            s.record(_turn(session, t * 100 + i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    s.close()  # no explicit flush: close must write every accepted turn
    reader = ConversationStore(pg_url)
    try:
        assert sum(1 for r in reader.iter_rows() if r["session_id"] == session) == 100
    finally:
        reader.close()


def test_export_since_from_postgres(store, tmp_path):
    session = uuid.uuid4().hex
    store.record(_turn(session, 0, created_at=datetime.now(timezone.utc) - timedelta(days=3)))
    store.record(_turn(session, 1))
    out = tmp_path / "turns.jsonl"
    store.export(out, since=datetime.now(timezone.utc) - timedelta(days=1))
    mine = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    mine = [r for r in mine if r["session_id"] == session]
    assert [r["request_id"] for r in mine] == [f"{session}-1"]


def test_cli_conversations_export_sqlite(tmp_path):
    """`chatforge conversations export` (runs without PostgreSQL: the same code path on SQLite)."""
    from typer.testing import CliRunner

    from chatforge.cli import app

    url = f"sqlite:///{tmp_path / 'conv.db'}"
    with ConversationStore(url) as s:
        s.record(_turn("s", 0, created_at=datetime.now(timezone.utc) - timedelta(days=3)))
        s.record(_turn("s", 1))
    out = tmp_path / "out.csv"
    r = CliRunner().invoke(app, ["conversations", "export", "--url", url, "--out", str(out), "--format", "csv",
                                 "--since", "24h"])
    assert r.exit_code == 0, r.output
    assert "exported 1 turns" in r.output and out.read_text(encoding="utf-8").count("\n") == 2
    missing = CliRunner().invoke(app, ["conversations", "export", "--url", f"sqlite:///{tmp_path / 'nope.db'}",
                                       "--out", str(out)])
    assert missing.exit_code == 2 and "no conversation database" in missing.output
    assert not (tmp_path / "nope.db").exists()
    bad = CliRunner().invoke(app, ["conversations", "export", "--url", url, "--out", str(out), "--since", "soon"])
    assert bad.exit_code == 2 and "--since 'soon'" in bad.output


def test_a_store_of_the_first_schema_is_migrated_in_place_on_postgres(pg_url):
    """As on SQLite (tests/serving/test_store.py): the columns added since the first release are added by
    ALTER TABLE when the store opens, in a schema of its own so that the other tests' table is untouched."""
    from sqlalchemy import create_engine, text

    schema = f"migrate_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f"CREATE TABLE {schema}.turns (id SERIAL PRIMARY KEY, created_at TIMESTAMP NOT NULL, "
                          "session_id VARCHAR(128), request_id VARCHAR(128), model VARCHAR(256), "
                          "model_version VARCHAR(64), user_text TEXT, reply TEXT, intent VARCHAR(256), "
                          "intent_score FLOAT, ttft_ms FLOAT, latency_ms FLOAT, status VARCHAR(64))"))
        conn.execute(text(f"INSERT INTO {schema}.turns (created_at, session_id, user_text, status) "
                          "VALUES (now(), 's', 'old question', 'OK')"))
    try:
        kwargs = {"connect_args": {"options": f"-csearch_path={schema}"}}
        with ConversationStore(pg_url, engine_kwargs=kwargs) as s:
            s.record(_turn("s", 1, context=[{"role": "user", "text": "안녕"}], context_turns=1, path="retrieval"))
            old, new = s.session("s")
        assert (old["user_text"], old["context"], old["context_turns"], old["path"]) == ("old question", None, None,
                                                                                         None)
        assert (new["context"], new["context_turns"], new["path"]) == ([{"role": "user", "text": "안녕"}], 1,
                                                                        "retrieval")
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


class _Link:
    """A TCP relay on 127.0.0.1 in front of the PostgreSQL server: ``cut()`` drops every connection through it
    and refuses new ones (a server restarting, a network partition), ``restore()`` listens on the same port
    again. The store connects through it and never knows."""

    def __init__(self, target: str):
        from sqlalchemy.engine import make_url

        url = make_url(target)
        self.upstream = (url.host or "127.0.0.1", url.port or 5432)
        self._lock = threading.Lock()
        self._pairs: list = []
        self._listener = None
        self.port = 0
        self.restore()
        self.url = url.set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def restore(self) -> None:
        import socket

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port, self._listener = listener.getsockname()[1], listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        import socket

        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _accept(self, listener) -> None:
        import socket

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass


def _wait(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_database_outage_loses_no_turn(pg_url):
    """The database goes away under a running store (every connection dropped, new ones refused) and comes
    back: the turns recorded meanwhile are held and written then. Before, a batch was tried three times
    within 0.35 s and then row by row, and every turn of the outage was dropped."""
    link = _Link(pg_url)
    session = uuid.uuid4().hex
    store = ConversationStore(link.url, batch_size=4, backoff=(0.05, 0.2))
    try:
        for i in range(5):
            assert store.record(_turn(session, i))
        assert store.flush(timeout=10) and store.written == 5
        link.cut()
        for i in range(5, 15):
            assert store.record(_turn(session, i))
        assert _wait(lambda: not store.available, 15), "the store never noticed the outage"
        assert store.pending == 10 and store.failed == 0
        link.restore()
        assert store.flush(timeout=20)
        assert store.available and store.failed == 0 and store.written == 15
        assert [r["request_id"] for r in store.iter_rows(session_id=session)] == [f"{session}-{i}" for i in range(15)]
    finally:
        store.close(timeout=5)
        link.cut()


def test_a_database_down_at_start_is_waited_for(pg_url):
    """compose and Kubernetes start containers in any order: a replica whose PostgreSQL is not up yet used to
    fail at start-up (the schema was made in the constructor); now it starts, holds the turns, and makes the
    schema and writes them when the database answers."""
    from sqlalchemy import create_engine, text

    schema = f"late_{uuid.uuid4().hex[:12]}"
    link = _Link(pg_url)
    link.cut()
    store = ConversationStore(link.url, engine_kwargs={"connect_args": {"options": f"-csearch_path={schema}"}},
                              backoff=(0.05, 0.2))
    admin = create_engine(pg_url)
    try:
        assert not store.available
        for i in range(3):
            assert store.record(_turn("late", i))
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        link.restore()
        assert store.flush(timeout=20) and store.available and store.written == 3
        with admin.connect() as conn:
            assert conn.execute(text(f"SELECT count(*) FROM {schema}.turns")).scalar() == 3
    finally:
        store.close(timeout=5)
        link.cut()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


def test_availability_follows_the_database_without_traffic(pg_url):
    """With no turn to write, the store still probes a database that was down at start, so ``available`` (the
    chatforge_store_available metric) turns 1 when it answers, not at the next conversation."""
    link = _Link(pg_url)
    link.cut()
    store = ConversationStore(link.url, backoff=(0.05, 0.2))
    try:
        assert not store.available
        link.restore()
        assert _wait(lambda: store.available, 15), "the idle store never noticed the database was back"
        assert store.pending == 0 and store.written == 0
    finally:
        store.close(timeout=5)
        link.cut()


def test_two_replicas_writing_the_two_attempts_of_a_call_at_once_keep_one_row(pg_url):
    """Two replicas share one PostgreSQL; a call's first attempt was stored by replica A, and the client's retry went
    to replica B. Here A has looked the batch's request ids up and is about to insert when B writes the retry: before,
    B's lookup did not see A's uncommitted row, so both inserted and the call was two turns. Now B waits for A (a
    lock per request id, held to A's commit) and then finds A's row and updates it."""
    from sqlalchemy import create_engine, event, text

    session = uuid.uuid4().hex
    a = ConversationStore(pg_url, engine_kwargs={"connect_args": {"application_name": f"a-{session[:8]}"}})
    b = ConversationStore(pg_url, engine_kwargs={"connect_args": {"application_name": f"b-{session[:8]}"}})
    monitor = create_engine(pg_url, connect_args={"connect_timeout": 5})
    a_looked, b_looked, went_on = threading.Event(), threading.Event(), []

    def is_lookup(statement: str) -> bool:
        return statement.lstrip().upper().startswith("SELECT") and "request_id IN" in statement

    def b_blocked() -> bool:  # B's writer waits for a lock another session holds
        with monitor.connect() as conn:
            return bool(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND wait_event_type = 'Lock'"),
                {"name": f"b-{session[:8]}"}).scalar())

    def a_after(conn, cursor, statement, parameters, context, executemany):
        if not is_lookup(statement) or a_looked.is_set():
            return
        a_looked.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until B has read the table too, or waits for A
            if b_looked.wait(0.02):
                went_on.append("B looked the call up while A had not yet inserted")
                return
            if b_blocked():
                went_on.append("B waited for A")
                return
        went_on.append("B neither looked up nor waited")

    def b_after(conn, cursor, statement, parameters, context, executemany):
        if is_lookup(statement):
            b_looked.set()

    event.listen(a.engine, "after_cursor_execute", a_after)
    event.listen(b.engine, "after_cursor_execute", b_after)
    try:
        assert a.record(_turn(session, 0, reply="first attempt"))
        assert a_looked.wait(20)
        assert b.record(_turn(session, 0, reply="the retry"))
        assert a.flush(timeout=30) and b.flush(timeout=30)
        rows = [r for r in a.iter_rows(since=datetime.now(timezone.utc) - timedelta(hours=1))
                if r["session_id"] == session]
        assert [r["reply"] for r in rows] == ["the retry"]
        assert went_on == ["B waited for A"]
        assert (a.merged, b.merged) == (0, 1)
    finally:
        a.close()
        b.close()
        monitor.dispose()


def test_a_request_id_locked_by_a_writer_that_is_gone_does_not_stall_the_store(pg_url, monkeypatch):
    """The lock of a request id is held until its writer's transaction ends; a replica whose connection died
    mid-write holds it until PostgreSQL notices (TCP keepalive: hours). A batch with that id waits at most
    ADVISORY_LOCK_TIMEOUT_S, then is written without the lock: the store goes on writing."""
    from sqlalchemy import create_engine, text

    from chatforge.serving import store as store_mod

    monkeypatch.setattr(store_mod, "ADVISORY_LOCK_TIMEOUT_S", 0.2, raising=False)
    session = uuid.uuid4().hex
    turn = _turn(session, 0)
    holder = create_engine(pg_url, connect_args={"connect_timeout": 5})
    s = ConversationStore(pg_url)
    try:
        with holder.connect() as conn:  # a session-level lock: held until released, as by a stuck writer
            conn.execute(text("SELECT pg_advisory_lock(:ns, :k)"),
                         {"ns": store_mod._ADVISORY_NAMESPACE, "k": store_mod._advisory_key(turn.request_id)})
            assert s.record(turn)
            assert s.flush(timeout=10)  # before: waited for the lock for as long as it was held
            assert [r["reply"] for r in s.iter_rows() if r["session_id"] == session] == [turn.reply]
            conn.execute(text("SELECT pg_advisory_unlock_all()"))
    finally:
        s.close()
        holder.dispose()
