"""ConversationStore: batched background writes, flush/close durability, WAL, export."""

from __future__ import annotations

import csv
import json
import sqlite3
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event

from chatforge.serving.store import ConversationStore, Turn


@pytest.fixture()
def store(tmp_path):
    s = ConversationStore(f"sqlite:///{tmp_path / 'runs' / 'conv.db'}", batch_size=8)
    yield s
    s.close()


def _turn(i: int, **kw) -> Turn:
    base = dict(session_id=f"s{i % 3}", request_id=f"r{i}", model="gpt-tiny", model_version="1",
                user_text=f"안녕 {i}", reply=f"reply {i}", intent="greet", intent_score=0.9,
                ttft_ms=1.5, latency_ms=10.0 + i, status="OK")
    base.update(kw)
    return Turn(**base)


def test_records_are_written_after_flush(store, tmp_path):
    assert (tmp_path / "runs" / "conv.db").exists()  # parent dir and file created up front
    for i in range(50):
        assert store.record(_turn(i))
    assert store.flush(timeout=10)
    rows = list(store.iter_rows())
    assert len(rows) == 50 and store.written == 50
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(50)]
    assert rows[0]["user_text"] == "안녕 0" and rows[0]["intent_score"] == pytest.approx(0.9)
    assert rows[0]["created_at"].tzinfo is timezone.utc


def test_close_flushes_everything(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    s = ConversationStore(url, batch_size=4)
    for i in range(37):
        s.record(_turn(i))
    s.close()  # no explicit flush
    assert not s.record(_turn(99))  # refused after close, not silently lost
    n = sqlite3.connect(tmp_path / "c.db").execute("select count(*) from turns").fetchone()[0]
    assert n == 37


def test_sqlite_uses_wal(store, tmp_path):
    store.record(_turn(0))
    store.flush()
    mode = sqlite3.connect(tmp_path / "runs" / "conv.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_concurrent_records_from_threads(store):
    def worker(t: int) -> None:
        for i in range(25):
            store.record(_turn(t * 100 + i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert store.flush(timeout=10)
    ids = {r["request_id"] for r in store.iter_rows()}
    assert len(ids) == 200 and store.count() == 200


def test_export_jsonl_round_trip(store, tmp_path):
    for i in range(5):
        store.record(_turn(i))
    out = tmp_path / "export" / "turns.jsonl"
    assert store.export(out) == 5  # export flushes first
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["reply"] for r in rows] == [f"reply {i}" for i in range(5)]
    assert rows[2]["user_text"] == "안녕 2" and rows[2]["latency_ms"] == 12.0
    assert datetime.fromisoformat(rows[0]["created_at"]).tzinfo is not None
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # temp file replaced


def test_export_csv_and_since(store, tmp_path):
    old = datetime.now(timezone.utc) - timedelta(days=2)
    store.record(_turn(0, created_at=old))
    store.record(_turn(1))
    store.record(_turn(2))
    out = tmp_path / "turns.csv"
    assert store.export(out, format="csv", since=datetime.now(timezone.utc) - timedelta(days=1)) == 2
    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["request_id"] for r in rows] == ["r1", "r2"]
    assert set(rows[0]) >= {"id", "created_at", "session_id", "model", "intent", "ttft_ms", "status"}


def test_export_rejects_unknown_format(store, tmp_path):
    with pytest.raises(ValueError, match="allowed: jsonl, csv"):
        store.export(tmp_path / "x.parquet", format="parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_in_memory_store_works_across_threads():
    with ConversationStore("sqlite://") as s:
        for i in range(10):
            s.record(_turn(i))
        assert s.flush(timeout=10)
        assert s.count() == 10


def test_full_queue_refuses_instead_of_blocking(tmp_path):
    s = ConversationStore(f"sqlite:///{tmp_path / 'q.db'}", queue_size=1)
    entered, gate = threading.Event(), threading.Event()

    def hold_inserts(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT"):
            entered.set()
            gate.wait(10)  # bounded: a broken test must not hang the suite

    event.listen(s.engine, "before_cursor_execute", hold_inserts)
    try:
        assert s.record(_turn(0))
        assert entered.wait(5)  # the writer holds turn 0 inside its transaction
        accepted = [s.record(_turn(i)) for i in range(1, 20)]
        assert accepted == [True] + [False] * 18  # one slot in the queue, the rest refused at once
        gate.set()
        assert s.flush(timeout=10)
        assert s.count() == 2
    finally:
        gate.set()
        s.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        ConversationStore("sqlite://", batch_size=0)


def test_session_reads_one_conversation_in_order(store):
    for i in range(30):  # three sessions, interleaved
        assert store.record(_turn(i))
    rows = store.session("s1")
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(1, 30, 3)]
    assert store.session("nobody") == []


OLD_COLUMNS = ("id INTEGER PRIMARY KEY AUTOINCREMENT, created_at DATETIME NOT NULL, session_id VARCHAR(128), "
               "request_id VARCHAR(128), model VARCHAR(256), model_version VARCHAR(64), user_text TEXT, reply TEXT, "
               "intent VARCHAR(256), intent_score FLOAT, ttft_ms FLOAT, latency_ms FLOAT, status VARCHAR(64)")


def test_a_store_of_the_first_schema_is_migrated_in_place_and_keeps_its_rows(tmp_path):
    """A conversations.db written before the context/path columns existed: opening it adds them (old rows
    read None), and new turns with context are written and read back."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE turns ({OLD_COLUMNS})")
        db.execute("INSERT INTO turns (created_at, session_id, user_text, reply, status) "
                   "VALUES ('2026-01-02 03:04:05', 's', 'old question', 'old reply', 'OK')")
    with ConversationStore(f"sqlite:///{path}") as store:
        store.record(_turn(1, session_id="s", context=[{"role": "user", "text": "안녕"}], context_turns=1,
                           path="generation"))
        old, new = store.session("s")
    assert (old["user_text"], old["context"], old["context_turns"], old["path"]) == ("old question", None, None, None)
    assert (new["context"], new["context_turns"], new["path"]) == ([{"role": "user", "text": "안녕"}], 1, "generation")
    with sqlite3.connect(path) as db:  # the stored form is JSON text any sqlite3 reader can parse
        [(raw,)] = db.execute("SELECT context FROM turns WHERE context IS NOT NULL").fetchall()
    assert json.loads(raw) == [{"role": "user", "text": "안녕"}]
    # Opening it again finds nothing to add.
    with ConversationStore(f"sqlite:///{path}") as store:
        assert len(store.session("s")) == 2


def test_context_round_trips_through_both_export_formats(store, tmp_path):
    store.record(_turn(0, context=[{"role": "user", "text": "a,\"b\"\n"}, {"role": "assistant", "text": "c"}]))
    store.record(_turn(1))
    assert store.export(tmp_path / "t.jsonl", "jsonl") == 2
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0]["context"] == [{"role": "user", "text": "a,\"b\"\n"}, {"role": "assistant", "text": "c"}]
    assert rows[1]["context"] is None
    store.export(tmp_path / "t.csv", "csv")
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    assert json.loads(first["context"])[0]["text"] == "a,\"b\"\n"


def test_a_row_the_database_refuses_is_the_only_turn_lost(tmp_path):
    """A batch was one transaction: one row the database refused (here text that is no UTF-8) failed it 3 times
    and every turn of the batch was dropped; a turn that could not be made a row killed the writer thread
    (flush then waited for ever). Now the batch is retried row by row and only the bad turns are lost."""
    store = ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}", batch_size=8)
    gate, entered = threading.Event(), threading.Event()

    def hold_first_write(*_args, **_kw):
        if not gate.is_set():
            entered.set()
            assert gate.wait(10)

    event.listen(store.engine, "before_cursor_execute", hold_first_write)
    try:
        assert store.record(_turn(0))
        assert entered.wait(10)  # the writer holds r0's batch; the next turns queue into one batch
        for turn in (_turn(1), _turn(2, user_text="bad \ud800"), _turn(3),
                     _turn(4, context=[{"role": "user", "text": object()}]), _turn(5)):
            assert store.record(turn)
        gate.set()
        assert store.flush(10)
        assert [r["request_id"] for r in store.iter_rows()] == ["r0", "r1", "r3", "r5"]
        assert store.failed == 2 and store.written == 4
        assert store.record(_turn(6)) and store.flush(10)  # the writer is still alive
        assert store.count() == 5
    finally:
        gate.set()
        store.close()


class _Outage:
    """Makes the store's INSERTs fail as an unreachable database does (SQLAlchemy's OperationalError) until
    ``end()``; ``refused`` is set once it has refused ``after`` times."""

    def __init__(self, engine, after: int = 3):
        self.on, self.count, self.after, self.refused = True, 0, after, threading.Event()
        event.listen(engine, "before_cursor_execute", self)

    def __call__(self, conn, cursor, statement, *args):
        if self.on and statement.lstrip().upper().startswith("INSERT"):
            self.count += 1
            if self.count >= self.after:
                self.refused.set()
            from sqlalchemy.exc import OperationalError
            raise OperationalError(statement, {}, sqlite3.OperationalError("disk I/O error"))

    def end(self):
        self.on = False


class _Alerts:
    def __init__(self):
        self.raised = []

    def alert(self, title, description, *, key=None, severity="critical"):
        self.raised.append((title, severity))


def test_an_outage_holds_the_turns_and_writes_them_when_the_database_answers(tmp_path):
    """Before: three tries 50-200 ms apart, then row by row, then every turn of the outage was dropped (a
    PostgreSQL restart of a few seconds lost every conversation in it). Now the batch is held and retried
    with backoff until the database answers; the outage is raised as an alert, and its end too."""
    alerts = _Alerts()
    store = ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}", batch_size=4, alerts=alerts,
                              backoff=(0.01, 0.05), alert_after=0)
    outage = _Outage(store.engine, after=6)
    try:
        for i in range(12):
            assert store.record(_turn(i))
        assert outage.refused.wait(10)  # the writer met the outage several times over
        assert not store.available and store.pending == 12 and store.failed == 0
        assert alerts.raised == [("conversation store unavailable", "critical")]
        outage.end()
        assert store.flush(timeout=10)
        assert store.available and store.written == 12 and store.failed == 0 and store.pending == 0
        assert [r["request_id"] for r in store.iter_rows()] == [f"r{i}" for i in range(12)]
        assert alerts.raised[-1] == ("conversation store available again", "info")
    finally:
        outage.end()
        store.close()


def test_an_outage_longer_than_the_queue_drops_the_newest_turns_and_counts_them(tmp_path, caplog):
    store = ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}", batch_size=2, queue_size=3, backoff=(0.01, 0.05))
    outage = _Outage(store.engine, after=1)
    try:
        assert store.record(_turn(0))
        assert outage.refused.wait(10)  # the writer holds turn 0's batch; the queue takes 3 more
        accepted = [store.record(_turn(i)) for i in range(1, 7)]
        assert accepted == [True] * 3 + [False] * 3 and store.dropped == 3
        # one warning for the three, not one per turn (an outage at full traffic would flood the logs)
        assert sum("queue full" in r.getMessage() for r in caplog.records) == 1
        outage.end()
        assert store.flush(timeout=10) and store.count() == 4
    finally:
        outage.end()
        store.close()


def test_close_during_an_outage_gives_up_after_its_timeout(tmp_path):
    """close() must return (a draining server exits) and say what it lost, not retry for ever."""
    store = ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}", backoff=(0.01, 0.05))
    outage = _Outage(store.engine, after=2)
    for i in range(5):
        assert store.record(_turn(i))
    assert outage.refused.wait(10)
    closer = threading.Thread(target=store.close, kwargs={"timeout": 0.5})
    closer.start()
    closer.join(10)
    assert not closer.is_alive() and not store._thread.is_alive()
    assert store.failed == 5 and store.written == 0 and store.pending == 0


def test_a_sqlite_file_that_cannot_be_opened_still_fails_at_start(tmp_path):
    """An unreachable server database is waited for; a local file that cannot be made is a configuration
    error and stops start-up, as before."""
    from chatforge.serving.store import StoreConfigError

    (tmp_path / "conv.db").mkdir()  # a directory where the database file should be
    with pytest.raises(StoreConfigError, match="cannot be used: OperationalError: unable to open database file"):
        ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}")


def test_the_store_state_is_exported_as_prometheus_metrics(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from chatforge.serving.metrics import ServingMetrics

    def scrape(metrics) -> dict:
        return {(s.name, s.labels.get("outcome")): s.value
                for fam in text_string_to_metric_families(metrics.render().decode())
                for s in fam.samples if s.name.startswith("chatforge_store_")}

    store = ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}", backoff=(0.01, 0.05))
    metrics = ServingMetrics(process_metrics=False)
    metrics.watch_store(store)
    metrics.watch_store(store)  # once per registry: a second call must not register a duplicate
    try:
        assert store.record(_turn(0)) and store.flush(10)
        assert scrape(metrics) == {("chatforge_store_available", None): 1.0,
                                   ("chatforge_store_pending_turns", None): 0.0,
                                   ("chatforge_store_turns_total", "written"): 1.0,
                                   ("chatforge_store_turns_total", "failed"): 0.0,
                                   ("chatforge_store_turns_total", "dropped"): 0.0}
        outage = _Outage(store.engine, after=2)
        assert store.record(_turn(1)) and outage.refused.wait(10)
        seen = scrape(metrics)
        assert seen[("chatforge_store_available", None)] == 0.0 and seen[("chatforge_store_pending_turns", None)] == 1
        outage.end()
        assert store.flush(10) and scrape(metrics)[("chatforge_store_turns_total", "written")] == 2.0
    finally:
        store.close()


def test_a_short_outage_is_logged_not_alerted(tmp_path):
    """A database that is back before ``alert_after`` (a restart, or one starting a moment after the replicas on
    every compose ``up``) pages nobody: neither its start nor its end is alerted."""
    alerts = _Alerts()
    store = ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}", alerts=alerts, backoff=(0.01, 0.05),
                              alert_after=3600)
    outage = _Outage(store.engine, after=3)
    try:
        assert store.record(_turn(0)) and outage.refused.wait(10)
        assert not store.available
        outage.end()
        assert store.flush(timeout=10) and store.available and store.written == 1
        assert alerts.raised == []
    finally:
        outage.end()
        store.close()


def _request_ids(path) -> list[str]:
    from contextlib import closing

    with closing(sqlite3.connect(path)) as conn:
        return [r[0] for r in conn.execute("select request_id from turns order by id")]


def test_a_sqlite_file_removed_or_replaced_while_open_is_written_at_its_path_again(tmp_path, caplog):
    """Before: after `rm conv.db` (or a backup moved over it) the store went on writing into the unlinked file
    through its open connections; every later turn counted as written and was lost, without a log line."""
    path = tmp_path / "conv.db"
    store = ConversationStore(f"sqlite:///{path}", batch_size=4)
    try:
        assert store.record(_turn(0)) and store.flush(10)
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"conv.db{suffix}").unlink(missing_ok=True)
        assert store.record(_turn(1)) and store.flush(10)
        assert path.exists() and _request_ids(path) == ["r1"]
        assert any("was removed" in r.getMessage() for r in caplog.records)

        restored = tmp_path / "restored.db"  # a backup restored the usual way: copied beside it, moved over it
        from contextlib import closing

        with closing(sqlite3.connect(path)) as src, closing(sqlite3.connect(restored)) as dst:
            src.backup(dst)
        restored.replace(path)
        assert store.record(_turn(2)) and store.flush(10)
        assert _request_ids(path) == ["r1", "r2"]
        assert any("was replaced" in r.getMessage() for r in caplog.records)
        assert store.written == 3 and store.failed == 0
    finally:
        store.close()


_FIRST_SCHEMA = ("CREATE TABLE turns (id INTEGER PRIMARY KEY, created_at DATETIME NOT NULL, session_id VARCHAR(128), "
                 "request_id VARCHAR(128), model VARCHAR(256), model_version VARCHAR(64), user_text TEXT, reply TEXT, "
                 "intent VARCHAR(256), intent_score FLOAT, ttft_ms FLOAT, latency_ms FLOAT, status VARCHAR(64))")


@pytest.mark.parametrize("existing", [None, _FIRST_SCHEMA], ids=["new-file", "first-schema"])
def test_a_second_process_making_the_schema_at_the_same_moment_does_not_fail_start_up(tmp_path, monkeypatch, existing):
    """Before: two servers opening one SQLite file together (the default runs/conversations.db of two local
    servers, a restart beside a draining container on the same volume) both looked, both created: the later one
    died at start-up with "table turns already exists" (13 of 15 tries) or, on a store of an older chatforge,
    "duplicate column name: context". Here the other process's DDL runs just before ours, as in that race."""
    from contextlib import closing

    from sqlalchemy import create_engine

    import chatforge.serving.store as store_mod

    path = tmp_path / "conv.db"
    if existing:
        with closing(sqlite3.connect(path)) as conn:
            conn.execute(existing)
            conn.commit()
    raced = []
    real_make_engine = store_mod._make_engine

    def make_engine(url, **kwargs):
        engine = real_make_engine(url, **kwargs)

        @event.listens_for(engine, "before_cursor_execute")
        def _other_process_first(conn, cursor, statement, *args):
            if not raced and statement.lstrip().upper().startswith(("CREATE TABLE", "ALTER TABLE")):
                raced.append(statement.split("(")[0].strip())
                other = create_engine(f"sqlite:///{path}")
                try:  # the other server, a moment ahead: the whole schema of this version
                    store_mod.metadata.create_all(other)
                    store_mod._add_missing_columns(other, store_mod._NullLock)
                finally:
                    other.dispose()

        return engine

    monkeypatch.setattr(store_mod, "_make_engine", make_engine)
    store = ConversationStore(f"sqlite:///{path}")
    try:
        assert raced, "the race was not staged"
        assert store.record(_turn(0)) and store.flush(10)
        assert store.written == 1 and [r["request_id"] for r in store.iter_rows()] == ["r0"]
    finally:
        store.close()


def test_a_sqlite_file_that_was_read_only_is_written_once_it_is_writable_again(tmp_path):
    """Before: a store whose file was read-only (a volume mounted :ro, a file mode) held its turns as an outage, as
    it should, but its pooled connection had opened the file read-only and stayed so: after the mount or the mode
    was fixed the outage never ended and every turn was lost at shutdown. `PRAGMA query_only` stands in for the
    read-only file here (the same SQLITE_READONLY error; a read-only mount needs root)."""
    store = ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}", backoff=(0.01, 0.05))
    read_only = threading.Event()
    read_only.set()
    refused = threading.Event()

    @event.listens_for(store.engine, "connect")
    def _opened_read_only(dbapi_conn, _record):
        if read_only.is_set():
            dbapi_conn.execute("PRAGMA query_only=ON")

    @event.listens_for(store.engine, "handle_error")
    def _seen(ctx):
        if "readonly database" in str(ctx.original_exception):
            refused.set()

    store.engine.dispose()  # the connections from here on open "read-only"
    try:
        assert store.record(_turn(0))
        assert refused.wait(10)  # the write was refused as read-only (the outage starts right after)
        read_only.clear()  # the mount is fixed
        assert store.flush(timeout=10), "the outage went on after the file became writable"
        assert store.available and store.written == 1 and store.count() == 1
    finally:
        store.close(timeout=1)


def test_another_applications_turns_table_is_refused_not_altered(tmp_path):
    """Before: pointed at a database whose "turns" table belongs to something else, the server added its columns."""
    from contextlib import closing

    from chatforge.serving.store import NotAConversationStore

    path = tmp_path / "game.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE turns (id INTEGER PRIMARY KEY, player TEXT, score INTEGER)")
        conn.commit()
    with pytest.raises(NotAConversationStore, match="lacks created_at, reply, request_id, session_id, user_text"):
        ConversationStore(f"sqlite:///{path}")
    with closing(sqlite3.connect(path)) as conn:
        assert [r[1] for r in conn.execute("PRAGMA table_info(turns)")] == ["id", "player", "score"]


def test_a_file_that_is_not_a_database_is_one_clear_error(tmp_path):
    """Before: `chatforge serve` printed sqlite3's traceback."""
    from chatforge.serving.store import StoreConfigError

    path = tmp_path / "notes.db"
    path.write_text("shopping list, not a database\n" * 100)
    with pytest.raises(StoreConfigError, match=r"cannot be used: DatabaseError: file is not a database"):
        ConversationStore(f"sqlite:///{path}")
    assert path.read_text().startswith("shopping list")


def _commits(store: ConversationStore) -> list[int]:
    seen: list[int] = []
    event.listen(store.engine, "commit", lambda conn: seen.append(1))
    return seen


def _until_taken(store: ConversationStore) -> None:
    """Bounded wait until the writer has taken everything queued (it is then gathering or writing)."""
    import time

    deadline = time.monotonic() + 10
    while store._queue.qsize():
        assert time.monotonic() < deadline, "the writer never took the queued turn"
        time.sleep(0.001)  # polling the queue's size, bounded: not standing in for synchronisation


def test_turns_that_arrive_while_the_writer_gathers_share_one_transaction(tmp_path):
    # One turn per transaction cost 0.8-1.0 ms of CPU on a SQLite file, taken from the event loop and the model; one
    # transaction for 20 turns, 0.07 ms a turn. Before the writer gathered, a turn arriving after it had taken the
    # first was written in a transaction of its own.
    s = ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}", linger=5.0)
    try:
        commits = _commits(s)
        assert s.record(_turn(0))
        _until_taken(s)
        for i in range(1, 20):
            assert s.record(_turn(i))
        # flush() does not wait the 5 s out: it tells the writer to write what it has
        assert s.flush(timeout=2.5)
        assert s.written == 20 and len(commits) == 1
        assert [r["request_id"] for r in s.iter_rows()] == [f"r{i}" for i in range(20)]
    finally:
        s.close(timeout=10)


def test_close_does_not_wait_out_the_gathering_and_loses_nothing(tmp_path):
    import time

    s = ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}", linger=5.0)
    assert s.record(_turn(0))
    _until_taken(s)
    start = time.monotonic()
    s.close(timeout=10)
    assert time.monotonic() - start < 2.5
    with sqlite3.connect(tmp_path / "conv.db") as db:
        assert db.execute("SELECT request_id FROM turns").fetchall() == [("r0",)]


def test_an_idle_flush_leaves_nothing_behind_in_the_queue(store):
    for _ in range(100):
        assert store.flush(timeout=1)
    assert store._queue.qsize() == 0


@pytest.mark.parametrize("bad", [-0.1, 6.0])
def test_a_linger_out_of_range_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="linger must be 0-5 seconds"):
        ConversationStore(f"sqlite:///{tmp_path / 'conv.db'}", linger=bad)


def test_the_linger_is_an_operator_setting():
    from chatforge.settings import Settings, SettingsError

    s = ConversationStore.from_settings(Settings.from_env({"CHATFORGE_ENV": "test", "CHATFORGE_STORE_LINGER_MS": "0"}))
    try:
        assert s.linger == 0.0
    finally:
        s.close()
    d = ConversationStore.from_settings(Settings(env="test"))
    try:
        assert d.linger == pytest.approx(0.05)
    finally:
        d.close()
    with pytest.raises(SettingsError, match="CHATFORGE_STORE_LINGER_MS"):
        Settings.from_env({"CHATFORGE_STORE_LINGER_MS": "-1"})
