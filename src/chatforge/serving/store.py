"""Conversation store: every served turn, written off the request path, exportable for retraining.

SQLAlchemy 2 Core over any database URL; SQLite by default, in WAL mode so that exports
and ad-hoc ``sqlite3`` readers never block the writer. ``record()`` only enqueues; one
background thread writes batches, each in a single transaction (one fsync per batch rather
than per turn). ``flush()`` waits for everything recorded so far, and ``close()`` flushes,
so a turn that ``record()`` accepted is never lost on a clean shutdown.

A database that cannot be reached (a PostgreSQL server restarting, a network partition, SQLite's
"database is locked" past its busy timeout) is an *outage*, not a reason to drop turns: the writer keeps the
batch it holds and retries it with capped exponential backoff until the database answers, while ``record()``
goes on queueing (up to ``queue_size`` turns, then it drops and says so). The outage is logged once when it
starts and once when it ends, raised as an alert when an :class:`~chatforge.serving.alerts.AlertManager` is
given, and visible as ``available``/``pending`` (Prometheus: ``chatforge_store_*``). A server database that
is down when the process starts is the same outage: the schema is made when it first answers, so a replica
does not depend on its database starting first. Errors about the rows themselves (a value over a column's
size, a constraint) are not outages: such a batch is retried a few times, then written row by row so only the
refused rows are lost.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.pool import NullPool, StaticPool

from chatforge.fileio import atomic_writer
from chatforge.settings import Settings

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("jsonl", "csv")

metadata = MetaData()
turns = Table(
    "turns",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime, nullable=False, index=True),  # naive UTC (portable across backends)
    Column("session_id", String(128), index=True),
    Column("request_id", String(128), index=True),  # indexed: each batch looks its ids up (retries, see _merge_retries)
    Column("model", String(256)),
    Column("model_version", String(64)),
    Column("user_text", Text),
    Column("reply", Text),
    Column("intent", String(256)),
    Column("intent_score", Float),
    Column("ttft_ms", Float),
    Column("latency_ms", Float),
    Column("status", String(64)),
    # Added after the first release (``_add_missing_columns`` migrates older stores in place):
    Column("context", Text),  # the conversation's earlier turns as sent: JSON [{"role", "text"}], oldest first
    Column("context_turns", Integer),  # how many of them the model read before the message
    Column("path", String(32)),  # reply policy: which path answered (scripted, retrieval, generation, fallback)
    # Synthetic traffic (a load test's calls, marked by the x-chatforge-traffic header): what made it, e.g.
    # "loadtest"; NULL for real users. Kept (the write path is part of what a load test measures, and a header
    # must not be able to make the server forget a conversation) but left out of exports unless asked for.
    Column("traffic", String(32)),
)


# Backoff while the database is unreachable: 0.1 s doubling to 5 s (a restarting server is back within seconds;
# a long outage is retried every 5 s, not hammered).
OUTAGE_BACKOFF_S = (0.1, 5.0)
# An outage is alerted on once it has lasted this long: a database that starts a moment after the replicas
# (every compose `up`) or a blip is logged, not paged.
OUTAGE_ALERT_AFTER_S = 10.0
DROP_LOG_INTERVAL_S = 10.0  # at most one "queue full" line this often
# How long the writer gathers turns before it writes them in one transaction. A transaction of one row cost 0.8-1.0 ms
# of CPU on a SQLite file here and one of 20 rows 0.07 ms a row (its begin, retry lookup and commit are per
# transaction), and that CPU is taken from the event loop and the model on a 2-core server: one turn per transaction
# had the writer spending as much CPU per reply as the rest of the server. flush() and close() do not wait it out.
STORE_LINGER_S = 0.05
_FLUSH = object()  # put by flush(): write what has gathered now


def is_outage(exc: BaseException) -> bool:
    """True for errors that say the database cannot be used right now (connection refused or lost, server
    shutting down, SQLite busy or unable to open), as against errors about the rows themselves
    (``IntegrityError``, ``DataError``: retrying those cannot help)."""
    if isinstance(exc, DisconnectionError | OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _read_only_sqlite(exc: BaseException) -> bool:
    """SQLite's SQLITE_READONLY: "attempt to write a readonly database"."""
    return isinstance(exc, DBAPIError) and isinstance(exc.orig, sqlite3.OperationalError) \
        and "readonly database" in str(exc.orig)


class _GaveUp(Exception):
    """The database stayed unreachable until :meth:`ConversationStore.close` gave up waiting."""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _naive_utc(dt: datetime) -> datetime:
    return dt.astimezone(timezone.utc).replace(tzinfo=None) if dt.tzinfo is not None else dt


@dataclass
class Turn:
    """One request/reply exchange (a Chat reply or a Classify result)."""

    session_id: str | None = None
    request_id: str | None = None
    model: str | None = None
    model_version: str | None = None
    user_text: str | None = None
    reply: str | None = None
    intent: str | None = None
    intent_score: float | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    status: str = "OK"
    created_at: datetime = field(default_factory=_utcnow)
    context: list[dict[str, str]] | None = None  # earlier turns as sent, [{"role", "text"}], oldest first
    context_turns: int | None = None
    path: str | None = None
    traffic: str | None = None  # synthetic traffic ("loadtest"); None for real users

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        row["created_at"] = _naive_utc(self.created_at)
        # JSON text rather than a JSON column type: the same on SQLite and PostgreSQL, readable by sqlite3.
        row["context"] = json.dumps(self.context, ensure_ascii=False) if self.context else None
        return row


_COLUMNS = ["id"] + [f.name for f in fields(Turn)]


class ConversationStore:
    """Asynchronous, batched writer of :class:`Turn` rows to ``url`` (any SQLAlchemy URL).

    For a SQLite file, its parent directory and the file are created here (fail fast at
    start-up rather than on the first request); ``sqlite://`` is an in-memory database
    pinned to one connection so the writer thread and readers share it.
    """

    def __init__(self, url: str, *, batch_size: int = 256, queue_size: int = 10_000,
                 engine_kwargs: dict[str, Any] | None = None, alerts: Any = None,
                 backoff: tuple[float, float] = OUTAGE_BACKOFF_S, alert_after: float = OUTAGE_ALERT_AFTER_S,
                 linger: float = STORE_LINGER_S) -> None:
        if batch_size < 1 or queue_size < 1:
            raise ValueError("batch_size and queue_size must be >= 1")
        if not 0 <= linger <= 5:
            raise ValueError(f"linger must be 0-5 seconds (how long turns gather before a write), got {linger}")
        self.linger = linger
        if not 0 < backoff[0] <= backoff[1]:
            raise ValueError(f"backoff must be (first, cap) seconds with 0 < first <= cap, got {backoff}")
        self.url = url
        self.batch_size = batch_size
        self.alerts, self._backoff, self._alert_after = alerts, backoff, alert_after
        self._alerted = False  # this outage was alerted on (so its end is too)
        self.engine = _make_engine(url, **(engine_kwargs or {}))
        # A SQLite file's path, and the file (device, inode) this store writes: see _reopen_if_replaced.
        self._sqlite_file, self._file_id = _sqlite_file(url), None
        # One pinned connection (in-memory SQLite) must not be used by two threads at once.
        self._db_lock = threading.Lock() if isinstance(self.engine.pool, StaticPool) else None
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._outage_since: float | None = None  # time.monotonic() of the first failure of an outage
        self.available = True
        if self._sqlite_file is not None and (problem := _sqlite_write_problem(self._sqlite_file)):
            # SQLite says only "unable to open database file" for a folder it may not write, and opens a file it may
            # not write read-only: the server started, then held every turn as if the database were down and lost
            # them. A volume with the wrong owner or mode is a configuration error: fail at start-up, naming it.
            self.engine.dispose()
            raise StoreConfigError(f"conversation store {_safe_url(url)} cannot be used: {problem} "
                                   "(CHATFORGE_STORE_URL names it)")
        try:
            self._ensure_schema()
        except Exception as e:
            # A local SQLite file that cannot be made or opened is a configuration error: fail at start-up. A
            # server database that is not up yet (compose and Kubernetes start containers in any order) is an
            # outage like any other: serve, queue the turns, make the schema when it answers.
            if self.engine.dialect.name == "sqlite" or not is_outage(e):
                self.engine.dispose()
                if isinstance(e, (ValueError, OSError)):  # NotAConversationStore, a folder that cannot be made
                    raise
                # e.g. a file that is not a SQLite database: one line naming the store and why, not a traceback
                reason = getattr(e, "orig", None) or e
                raise StoreConfigError(f"conversation store {_safe_url(url)} cannot be used: "
                                       f"{type(reason).__name__}: {reason} (CHATFORGE_STORE_URL names it)") from e
            self._outage_started(e, at_start=True)
        self._queue: queue.Queue[Turn | object | None] = queue.Queue(maxsize=queue_size)
        self._cond = threading.Condition()
        self._accepted = 0  # turns accepted by record()
        self._processed = 0  # turns the writer has finished with (committed or failed)
        self.written = self.failed = self.dropped = 0
        self.merged = 0  # written turns that were a call sent again, folded into the row already stored for it
        self._drop_logged_at = -DROP_LOG_INTERVAL_S
        self._closed = False
        self._give_up = threading.Event()  # close() ran out of time: stop retrying an unreachable database
        self._thread = threading.Thread(target=self._run, name="chatforge-store", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> ConversationStore:
        """Under ``env == "test"`` this is in-memory unless a store URL was given explicitly."""
        return cls(settings.effective_store_url, **{"linger": settings.store_linger_ms / 1000.0, **kwargs})

    @property
    def pending(self) -> int:
        """Turns accepted by :meth:`record` and not yet written (or given up on)."""
        with self._cond:
            return self._accepted - self._processed

    # -- writing -----------------------------------------------------------------------------
    def record(self, turn: Turn) -> bool:
        """Enqueue ``turn`` (never blocks). False if the store is closed or its queue is full."""
        with self._cond:
            # Checked under the lock so that no accepted turn can queue behind close()'s stop marker.
            if self._closed:
                self.dropped += 1
                log.warning("turn recorded after close() dropped", extra={"request_id": turn.request_id})
                return False
            try:
                self._queue.put_nowait(turn)
            except queue.Full:
                self.dropped += 1
                # One line per 10 s, not per turn: a long outage at full traffic must not flood the logs.
                now = time.monotonic()
                if now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
                    self._drop_logged_at = now
                    log.warning("conversation store queue full (%d turns held); turns dropped: %d so far",
                                self._queue.maxsize, self.dropped, extra={"request_id": turn.request_id})
                return False
            self._accepted += 1
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every turn recorded before this call was handled; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._accepted
            waiting = self._processed < target
        if waiting and self.linger > 0:
            try:
                self._queue.put_nowait(_FLUSH)  # the writer stops gathering and writes now
            except queue.Full:
                pass  # a full queue is written in whole batches, without gathering
        with self._cond:
            while self._processed < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Flush, stop the writer and dispose of the engine's connections. Turns still unwritten after
        ``timeout`` (the database unreachable all that time) are counted in ``failed`` and logged."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        if not self.flush(timeout):
            log.error("conversation store: flush timed out on close; %d unwritten turn(s) are lost", self.pending)
            self._give_up.set()
        self._queue.put(None)  # never blocks for long: the writer drains the queue, giving up at once now
        self._thread.join(timeout)
        self.engine.dispose()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        delay = self._backoff[0]
        while True:
            if self._outage_since is None:
                first = self._queue.get()
                delay = self._backoff[0]
            else:
                # Idle during an outage (no turn to write): probe the database on the backoff's schedule, so that
                # `available` (and its metric and alerts) follows it even while no traffic comes in.
                try:
                    first = self._queue.get(timeout=delay)
                except queue.Empty:
                    self._probe()
                    delay = min(delay * 2, self._backoff[1])
                    continue
            if first is None:
                return
            if first is _FLUSH:  # nothing gathered: nothing to hurry
                continue
            # Gather what else arrives within `linger` (one transaction for many turns), unless flush() says not to.
            batch, stop = [first], False
            until = time.monotonic() + self.linger
            while len(batch) < self.batch_size:
                left = until - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _FLUSH:
                    until = 0.0  # take what is queued, wait for nothing more
                    continue
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._write(batch)
            with self._cond:
                self._processed += len(batch)
                self._cond.notify_all()
            if stop:
                return

    def _write(self, batch: list[Turn]) -> None:
        """Insert ``batch`` in one transaction. While the database is unreachable the batch is held and retried
        (backoff up to ``backoff[1]`` seconds) until it answers or :meth:`close` gives up; any other error is
        retried twice, then the rows are written one by one, so a row the database refuses (bad text, a value
        over a column's size on PostgreSQL) is the only one lost."""
        rows: list[dict[str, Any]] = []
        for t in batch:
            try:
                rows.append(t.row())
            except Exception:  # noqa: BLE001 - one unusable turn must not stop the writer thread
                self.failed += 1
                log.exception("conversation store: turn dropped, it cannot be made a row",
                              extra={"request_id": t.request_id})
        if not rows:
            return
        for attempt in range(1, 4):
            error = self._insert_through_outages(rows)
            if error is None:
                self.written += len(rows)
                return
            if isinstance(error, _GaveUp):
                self.failed += len(rows)
                return
            log.error("conversation store write failed: %s", error, extra={"rows": len(rows), "attempt": attempt})
            if attempt < 3:
                time.sleep(0.05 * 2**attempt)  # back off a transient lock or serialisation error
        if len(rows) > 1:
            log.error("conversation store: a batch failed 3 times; writing its rows one by one",
                      extra={"rows": len(rows)})
        for row in rows:
            error = self._insert_through_outages([row])
            if error is None:
                self.written += 1
                continue
            self.failed += 1
            if not isinstance(error, _GaveUp):
                log.error("conversation store gave up on a turn: %s", type(error).__name__,
                          extra={"request_id": row.get("request_id")})

    def _insert_through_outages(self, rows: list[dict[str, Any]]) -> Exception | None:
        """Insert ``rows`` in one transaction, waiting out an outage (backoff up to ``backoff[1]`` seconds) until
        the database answers; None when written, else the error that is not an outage, or :class:`_GaveUp` when
        :meth:`close` ran out of time during the outage."""
        delay = self._backoff[0]
        while True:
            try:
                self._reopen_if_replaced()
                self._ensure_schema()
                self._insert(rows)
            except Exception as e:  # noqa: BLE001 - returned to the caller, which decides
                if not is_outage(e):
                    return e
                if _read_only_sqlite(e):
                    # SQLite opened the file read-only (a read-only mount or file mode) and its connection stays so:
                    # without new connections, fixing the mount or the mode never ended the outage (until a restart).
                    self.engine.dispose()
                self._outage_started(e)
                self._maybe_alert()
                if self._give_up.wait(delay):
                    log.error("conversation store: %d turn(s) lost, the database stayed unreachable until "
                              "shutdown", len(rows))
                    return _GaveUp()
                delay = min(delay * 2, self._backoff[1])
                continue
            self._outage_ended()
            return None

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                for attempt in range(1, 4):
                    try:
                        metadata.create_all(self.engine)
                        _add_missing_columns(self.engine, self._locked)
                        break
                    except NotAConversationStore:
                        raise
                    except Exception:
                        # Another process opening the same database (a second server on the one SQLite file, replicas
                        # starting together on one PostgreSQL) made the table or a column between our look and our
                        # CREATE/ALTER ("table turns already exists", "duplicate column name"): done if it made all
                        # of them, else look again (it adds columns one by one) while the table is there.
                        exists, complete = _schema_state(self.engine, self._locked)
                        if complete:
                            break
                        if attempt == 3 or not exists:
                            raise
                if self._sqlite_file is not None:
                    self._file_id = _file_id(self._sqlite_file)
                self._schema_ready = True

    def _reopen_if_replaced(self) -> None:
        """Open the SQLite file at the store's path again when it was removed or replaced while the store ran.

        SQLite writes through the connections it holds open, to the file they opened: after an ``rm`` (an operator
        starting afresh, a clean-up script) or a ``mv`` over it (a backup restored) every later turn went to a file
        no longer in any folder, counted as written, and was gone when the process ended, without a line in the
        log. One ``stat`` per batch finds it; the pooled connections are closed and the schema made at the path."""
        if self._sqlite_file is None or self._file_id is None:
            return
        now = _file_id(self._sqlite_file)
        if now == self._file_id:
            return
        log.warning("conversation store: %s was %s while the store was open; writing to the file at that path "
                    "from now on", self._sqlite_file, "removed" if now is None else "replaced",
                    extra={"store": _safe_url(self.url)})
        with self._schema_lock:
            self._file_id, self._schema_ready = None, False
            self.engine.dispose()  # the old file's connections: closing them checkpoints into it, not the new one
        try:
            self._sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # the file cannot be opened then: an outage, held and retried like any other

    def _probe(self) -> None:
        """One connection attempt (and the schema, if it is not made yet): ends the outage if it succeeds."""
        try:
            self._ensure_schema()
            with self._locked(), self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as e:  # noqa: BLE001 - an outage goes on; anything else shows on the next write
            if is_outage(e):
                self._maybe_alert()
                return
        self._outage_ended()

    def _outage_started(self, exc: BaseException, at_start: bool = False) -> None:
        if self._outage_since is not None:
            return
        self._outage_since, self.available, self._alerted = time.monotonic(), False, False
        self._dropped_before_outage = getattr(self, "dropped", 0)
        self._outage_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        # At start-up a database that comes up a moment later than this process is ordinary (compose, Kubernetes).
        log.log(logging.WARNING if at_start else logging.ERROR,
                "conversation store unavailable%s; turns are held and retried until it answers (%s)",
                " at start-up" if at_start else "", self._outage_reason, extra={"store": _safe_url(self.url)})

    def _maybe_alert(self) -> None:
        if self.alerts is None or self._alerted or self._outage_since is None:
            return
        took = time.monotonic() - self._outage_since
        if took >= self._alert_after:
            self._alerted = True
            self.alerts.alert("conversation store unavailable",
                              f"store: {_safe_url(self.url)}\nerror: {self._outage_reason}\nunavailable for "
                              f"{took:.0f} s; turns are held (up to the queue's size) and written when it answers",
                              key=("store", "unavailable"))

    def _outage_ended(self) -> None:
        if self._outage_since is None:
            return
        took = time.monotonic() - self._outage_since
        dropped = self.dropped - self._dropped_before_outage
        self._outage_since, self.available = None, True
        log.warning("conversation store available again after %.1f s; held turns are being written, %d dropped "
                    "(queue full)", took, dropped, extra={"store": _safe_url(self.url)})
        if self.alerts is not None and self._alerted:
            self.alerts.alert("conversation store available again",
                              f"store: {_safe_url(self.url)}\nunavailable for {took:.1f} s; turns dropped because "
                              f"the queue was full: {dropped}", key=("store", "available"), severity="info")

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        try:
            self._insert_once(rows, serialised=True)
        except OperationalError as e:
            if not _lock_timed_out(e):
                raise
            # Another writer held a lock of one of these request ids past ADVISORY_LOCK_TIMEOUT_S: a replica whose
            # connection died mid-write holds it until the server notices. Waiting would stall every turn behind
            # this batch; writing without the lock risks only one call stored twice.
            log.warning("conversation store: a request id of this batch stayed locked by another writer for %.0f s; "
                        "writing without waiting for it (a call sent twice may be stored twice)",
                        ADVISORY_LOCK_TIMEOUT_S)
            self._insert_once(rows, serialised=False)

    def _insert_once(self, rows: list[dict[str, Any]], serialised: bool) -> None:
        with self._locked(), self.engine.begin() as conn:
            if serialised:
                _serialise_retries(conn, rows)
            fresh, merged = _merge_retries(conn, rows)
            if fresh:
                conn.execute(turns.insert(), fresh)
        self.merged += merged  # committed

    def _locked(self):
        return self._db_lock if self._db_lock is not None else _NullLock()

    # -- reading -----------------------------------------------------------------------------
    def iter_rows(self, since: datetime | None = None, session_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Stored rows in insertion order (``created_at`` as aware UTC), optionally ``>= since``
        and of one conversation (``session_id``, indexed)."""
        query = select(turns).order_by(turns.c.id)
        if since is not None:
            query = query.where(turns.c.created_at >= _naive_utc(since))
        if session_id is not None:
            query = query.where(turns.c.session_id == session_id)
        self._ensure_schema()
        with self._locked(), self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        for row in rows:
            yield _decoded(row)

    def session(self, session_id: str) -> list[dict[str, Any]]:
        """One conversation's turns, oldest first (recorded turns are flushed first)."""
        self.flush()
        return list(self.iter_rows(session_id=session_id))

    def count(self) -> int:
        return sum(1 for _ in self.iter_rows())

    def export(self, path: str | os.PathLike[str], format: Literal["jsonl", "csv"] = "jsonl",  # noqa: A002
               since: datetime | None = None, *, include_synthetic: bool = False) -> int:
        """Write the stored turns (flushed first) to ``path`` atomically; returns the row count. Turns of synthetic
        traffic (``traffic`` set: a load test's) are left out unless ``include_synthetic``.
        To export a store without opening it for writing, use :func:`export_store`."""
        _check_format(format)
        self.flush()
        rows = self.iter_rows(since)
        if not include_synthetic:
            rows = (r for r in rows if r["traffic"] is None)
        return _write_export(path, format, rows)


# Two turns are one call sent twice (a client's retry after UNAVAILABLE or RESOURCE_EXHAUSTED, a caller re-sending
# a request under its id) when these agree, and the id is set. The request id alone is not enough: a caller may fix
# one id for many calls (an upstream trace id, ChatbotClient(request_id=...)), and those are different turns.
_RETRY_KEY = ("request_id", "session_id", "user_text", "context")
_IN_CHUNK = 500  # request ids per IN (...): well under SQLite's and PostgreSQL's bound parameter limits


def _retry_key(row: Any) -> tuple | None:
    """What makes two rows one call: the :data:`_RETRY_KEY` columns and the kind of call (a Classify has no reply);
    None for a row without a request id (never merged)."""
    get = row.get if isinstance(row, dict) else row._mapping.get
    if not get("request_id"):
        return None
    return (*(get(c) for c in _RETRY_KEY), get("reply") is None)


# PostgreSQL advisory locks come in a (namespace, key) form of two 32-bit integers: this namespace is chatforge's
# ("chat" in ASCII), so the store's locks cannot collide with another application's on the same database.
_ADVISORY_NAMESPACE = 0x63686174


# How long a batch waits for another writer's lock on one of its request ids (PostgreSQL's lock_timeout, for this
# transaction only); the other writer's transaction takes milliseconds, unless its connection died mid-write.
ADVISORY_LOCK_TIMEOUT_S = 5.0


def _lock_timed_out(exc: BaseException) -> bool:
    """PostgreSQL's lock_not_available (SQLSTATE 55P03): lock_timeout passed while waiting for a lock."""
    orig = getattr(exc, "orig", None)
    return (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == "55P03"


def _advisory_key(request_id: str) -> int:
    """A request id as a signed 32-bit advisory lock key, the same in every process (not Python's salted hash)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode("utf-8"), digest_size=4).digest(), "big", signed=True)


def _serialise_retries(conn: Any, rows: list[dict[str, Any]]) -> None:
    """Make the :func:`_merge_retries` lookup and the writes after it one step against every other writer of the
    same database, so that the two attempts of one call written by two replicas at the same instant cannot both find
    nothing and both insert (before, they could: the lookup was only a read).

    PostgreSQL: a transaction-scoped advisory lock per request id of the batch (a hash of it: a collision only makes
    two unrelated writers wait for each other), taken in ascending key order in one statement, so two batches that
    share ids wait for each other instead of deadlocking; released at commit or rollback. A lock not granted within
    :data:`ADVISORY_LOCK_TIMEOUT_S` (its holder's connection died mid-write) fails the transaction, and
    :meth:`ConversationStore._insert` writes the batch again without locks. SQLite: ``BEGIN
    IMMEDIATE`` takes the database's write lock before the lookup (Python's driver would begin the transaction only
    at the first INSERT, after the lookup, so another process could write in between); a second writer waits for it
    (``busy_timeout``) as it waits for any write. Other databases: the lookup alone."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        return
    keys = sorted({_advisory_key(r["request_id"]) for r in rows if r.get("request_id")})
    if dialect == "postgresql" and keys:
        # a lock held past this is a writer that is gone: _insert then writes without it
        conn.execute(text("SELECT set_config('lock_timeout', :ms, true)"),
                     {"ms": f"{int(ADVISORY_LOCK_TIMEOUT_S * 1000)}ms"})
        # unnest yields the array's elements in order, and each row's lock is taken as the row is produced
        conn.execute(text("SELECT pg_advisory_xact_lock(:namespace, k) FROM unnest(CAST(:keys AS integer[])) AS k"),
                     {"namespace": _ADVISORY_NAMESPACE, "keys": keys})


def _merge_retries(conn: Any, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Make writing ``rows`` idempotent per call, inside the batch's transaction: a row that repeats a call already
    stored (same :func:`_retry_key`) updates that row instead of adding one, and of two in the batch the later
    replaces the earlier. The first attempt's ``id`` and ``created_at`` stay; the rest is the later attempt's, the
    answer its caller received last. Returns (rows to insert, rows merged). A retried Classify was stored twice
    before (the first attempt's answer lost on the way back, or a caller re-sending under the same id).

    A lookup, not a unique constraint (the key includes text, and stores written before hold duplicates); that two
    writers (replicas sharing one PostgreSQL, servers sharing one SQLite file) cannot both miss each other's row and
    both insert is :func:`_serialise_retries`' work, called first in the same transaction."""
    ids = sorted({r["request_id"] for r in rows if r.get("request_id")})
    existing: dict[tuple, int] = {}
    cols = (turns.c.id, *(turns.c[c] for c in _RETRY_KEY), turns.c.reply)
    for i in range(0, len(ids), _IN_CHUNK):
        query = select(*cols).where(turns.c.request_id.in_(ids[i:i + _IN_CHUNK])).order_by(turns.c.id)
        for stored in conn.execute(query):
            existing.setdefault(_retry_key(stored), stored.id)
    fresh: list[dict[str, Any]] = []
    in_batch: dict[tuple, int] = {}
    merged = 0
    for row in rows:
        key = _retry_key(row)
        if key is None:
            fresh.append(row)
        elif key in existing:
            conn.execute(turns.update().where(turns.c.id == existing[key])
                         .values({k: v for k, v in row.items() if k != "created_at"}))
        elif key in in_batch:
            first = fresh[in_batch[key]]
            fresh[in_batch[key]] = {**row, "created_at": first["created_at"]}
        else:
            in_batch[key] = len(fresh)
            fresh.append(row)
            continue
        if key is not None:
            merged += 1
            log.info("conversation store: a call sent again (same request id and message) is kept as one turn",
                     extra={"request_id": row["request_id"]})
    return fresh, merged


class StoreConfigError(ValueError):
    """The store's database cannot be used at all (not a database, not ours): a configuration error at start-up."""


class NotAConversationStore(StoreConfigError):
    """The database has no conversation table (``turns`` with at least ``id`` and ``created_at``)."""


class StoreUnreadable(StoreConfigError):
    """A SQLite store that cannot be opened read-only where it lies, with what to do about it."""


def _wal_without_shm_hint(url: str) -> str | None:
    """Why a read-only open of a SQLite store failed, when the reason is its write-ahead log: SQLite reads ``X-wal``
    through a shared-memory index ``X-shm`` that it must create beside the file, which a read-only folder or mount
    (a backup, a volume mounted ``:ro`` into a sidecar) does not allow. None when that is not the case."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database.startswith("file:"):
        return None
    db = Path(database).expanduser()
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    if not wal.is_file() or shm.is_file() or os.access(db.parent, os.W_OK):
        return None
    return (f"{db} has a write-ahead log ({wal.name}) that SQLite can only read through a {shm.name} file it must "
            f"create beside it, and {db.parent} is read-only; copy {db.name} and {wal.name} to a writable folder and "
            f"export from there (or stop the server cleanly first: it folds the log into {db.name})")


def export_store(url: str, path: str | os.PathLike[str], format: Literal["jsonl", "csv"] = "jsonl",  # noqa: A002
                 since: datetime | None = None, *, include_synthetic: bool = False) -> int:
    """Write the turns stored at ``url`` to ``path`` atomically and return the row count, only reading the
    database: no schema is made or migrated (a store of an older chatforge is read as it is, its missing columns
    empty) and a SQLite file is opened read-only. Turns of synthetic traffic (``traffic`` set: a load test's) are
    left out unless ``include_synthetic``. A database without a conversation table (an empty file, another
    application's database) raises :class:`NotAConversationStore`; it is not given one.

    What ``chatforge conversations export`` runs: opening a :class:`ConversationStore` to export made the
    ``turns`` table and its indexes in whatever database it was pointed at, and switched a SQLite one to WAL."""
    _check_format(format)
    since_naive = None
    if since is not None:
        try:
            since_naive = _naive_utc(since)
        except OverflowError:
            raise ValueError(f"since={since!r} is out of range; allowed: 0001-01-01 to 9999-12-31 UTC") from None
    engine = _make_read_only_engine(url)
    try:
        with engine.connect() as conn:
            try:  # SQLite opens the file (and its write-ahead log) at the first statement
                inspector = inspect(conn)
                has_turns = inspector.has_table(turns.name)
            except OperationalError:
                hint = _wal_without_shm_hint(url)
                if hint is not None:
                    raise StoreUnreadable(hint) from None
                raise
            if not has_turns:
                raise NotAConversationStore(f"{_safe_url(url)} holds no conversation table ({turns.name!r}); "
                                            "is it a chatforge conversation store?")
            present = {c["name"] for c in inspector.get_columns(turns.name)}
            if not {"id", "created_at"} <= present:
                raise NotAConversationStore(f"the {turns.name!r} table of {_safe_url(url)} is not a conversation "
                                            "table (it has no id and created_at columns)")
            query = select(*(turns.c[name] for name in _COLUMNS if name in present)).order_by(turns.c.id)
            if since_naive is not None:
                query = query.where(turns.c.created_at >= since_naive)
            if not include_synthetic and "traffic" in present:  # an older store has no synthetic turns
                query = query.where(turns.c.traffic.is_(None))
            empty = dict.fromkeys(_COLUMNS)
            rows = (_decoded({**empty, **r._mapping}) for r in conn.execute(query))
            return _write_export(path, format, rows)
    finally:
        engine.dispose()


def _check_format(format: str) -> None:  # noqa: A002 - the export methods' argument
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; allowed: {', '.join(EXPORT_FORMATS)}")


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as callers see it: ``created_at`` aware UTC, ``context`` a list (or None)."""
    if row["created_at"] is not None:
        row["created_at"] = row["created_at"].replace(tzinfo=timezone.utc)
    row["context"] = json.loads(row["context"]) if row["context"] else None
    return row


def _write_export(path: str | os.PathLike[str], format: str, rows: Iterator[dict[str, Any]]) -> int:  # noqa: A002
    n = 0
    with atomic_writer(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS) if format == "csv" else None
        if writer is not None:
            writer.writeheader()
        for row in rows:
            row["created_at"] = row["created_at"].isoformat() if row["created_at"] is not None else None
            if writer is not None:
                row["context"] = json.dumps(row["context"], ensure_ascii=False) if row["context"] else None
                writer.writerow(row)
            else:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


# Columns every chatforge store has had since the first version: a "turns" table without them belongs to something else
_FIRST_COLUMNS = frozenset({"id", "created_at", "session_id", "request_id", "user_text", "reply"})


def _add_missing_columns(engine: Engine, locked) -> None:
    """Bring a store made by an older chatforge up to this schema: every column added since is nullable,
    so ``ALTER TABLE ... ADD COLUMN`` (one transaction) migrates it in place and old rows read as None.
    Only additions are ever made to ``turns``; a rename or type change would need a real migration tool."""
    with locked(), engine.begin() as conn:
        present = {c["name"] for c in inspect(conn).get_columns(turns.name)}
        if not _FIRST_COLUMNS <= present:  # another application's "turns": never altered
            raise NotAConversationStore(
                f"the {turns.name!r} table of {_safe_url(str(engine.url))} is not a conversation table (it lacks "
                f"{', '.join(sorted(_FIRST_COLUMNS - present))}); give the store a database of its own")
        missing = [c for c in turns.columns if c.name not in present]
        for column in missing:
            kind = column.type.compile(dialect=engine.dialect)
            conn.execute(text(f'ALTER TABLE {turns.name} ADD COLUMN "{column.name}" {kind}'))
        # create_all makes a table's indexes only with the table: an index added since (request_id) is made here
        indexes = {i["name"] for i in inspect(conn).get_indexes(turns.name)}
        new_indexes = [i for i in turns.indexes if i.name not in indexes]
        for index in new_indexes:
            index.create(conn, checkfirst=True)
    if missing:
        log.info("conversation store migrated: added column(s) %s", ", ".join(c.name for c in missing))
    if new_indexes:
        log.info("conversation store migrated: added index(es) %s", ", ".join(i.name for i in new_indexes))


def _schema_state(engine: Engine, locked) -> tuple[bool, bool]:
    """(``turns`` exists, it has every column of this version); (False, False) when the database cannot be asked."""
    try:
        with locked(), engine.connect() as conn:
            inspector = inspect(conn)
            if not inspector.has_table(turns.name):
                return False, False
            present = {c["name"] for c in inspector.get_columns(turns.name)}
    except Exception:  # noqa: BLE001 - the caller raises the error it met first
        return False, False
    return True, all(c.name in present for c in turns.columns)


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _safe_url(url: str) -> str:
    """The URL with its password masked, for logs and alerts."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown by its scheme only
        return url.split(":", 1)[0] + ":..."


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL naming one by path (not in-memory, not a ``file:`` URI); else None."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or "mode=memory" in str(parsed) \
            or database.startswith("file:"):
        return None
    return Path(database).expanduser().absolute()


def _sqlite_write_problem(path: Path) -> str | None:
    """Why this process cannot write the SQLite database ``path`` (its folder, where SQLite also makes the -wal and
    -shm files, or the file itself), with the owner and mode to change; None when it can."""
    uid = os.geteuid()
    for kind, p, need in (("folder", path.parent, os.W_OK | os.X_OK), ("file", path, os.W_OK)):
        try:
            st = os.stat(p)
        except OSError:
            continue  # a file not made yet: the folder decides
        if os.access(p, need, effective_ids=os.access in os.supports_effective_ids):
            continue
        try:
            read_only_fs = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        except OSError:
            read_only_fs = False
        where = "is on a read-only file system" if read_only_fs else "is not writable by this process"
        also = "; SQLite writes the database and its -wal and -shm files in that folder" if kind == "folder" else ""
        return (f"the {kind} {p} (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}) {where}; this process "
                f"runs as uid {uid}{also}. Make it writable by uid {uid} (e.g. chown -R {uid} {path.parent}; on "
                "Kubernetes: securityContext.fsGroup) or point CHATFORGE_STORE_URL at a writable place")
    return None


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None when it does not exist (or cannot be looked at)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _make_engine(url: str, **kwargs: Any) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2"):
        # libpq waits for a connection without limit by default: a server that drops packets would hold the
        # writer (and start-up) forever instead of counting as an outage.
        kwargs["connect_args"] = {"connect_timeout": 5, **kwargs.get("connect_args", {})}
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **kwargs)
    database = parsed.database
    in_memory = not database or database == ":memory:" or "mode=memory" in str(parsed)
    if in_memory:
        kwargs.setdefault("poolclass", StaticPool)
        kwargs.setdefault("connect_args", {"check_same_thread": False})
    elif not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL: readers don't block the writer; busy_timeout: wait instead of "database is locked".
        # busy_timeout first: switching a new file to WAL needs its write lock, which another process opening the
        # same file may hold for a moment ("database is locked" at start-up, with no wait, the other way round).
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    return engine


def _make_read_only_engine(url: str) -> Engine:
    """An engine for reading ``url`` only: a SQLite file is opened with ``mode=ro`` (SQLite refuses any write) and
    without the store's pragmas (``journal_mode=WAL`` would convert the file); other databases as the store opens
    them (the export runs nothing but SELECTs there)."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or "mode=memory" in str(parsed):
        return _make_engine(url)
    if database.startswith("file:"):  # already a SQLite URI: add mode=ro to its parameters
        return create_engine(parsed.update_query_dict({"mode": "ro", "uri": "true"}), poolclass=NullPool)
    uri = f"file:{quote(str(Path(database).expanduser().resolve()))}?mode=ro"
    return create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
                         poolclass=NullPool)
