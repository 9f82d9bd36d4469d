"""Structured logging for the server: JSON lines (or a human format), secret masking, privacy.

One event per line on stderr, each carrying the request and session ids of the request
being handled (read from :mod:`chatforge.context`), so a single ``grep request_id`` follows
a request through the interceptor, the servicer and the engine. Extra fields are passed
the standard way: ``log.info("rpc done", extra={"rpc": "Chat", "latency_ms": 12.5})``.

Metrics and the HTTP health mirror live in :mod:`chatforge.serving.metrics` and are
re-exported here so the server has one module to import.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import re
import select
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

from chatforge.context import request_id_var, session_id_var
from chatforge.serving.metrics import FAILURE_REASONS, MetricsHTTPServer, ServingMetrics
from chatforge.settings import LOG_HANDLER_ATTR, Settings, SettingsError, get_settings

__all__ = [
    "FAILURE_REASONS",
    "BackgroundLogHandler",
    "HumanFormatter",
    "JsonFormatter",
    "MetricsHTTPServer",
    "SecretMaskingFilter",
    "ServingMetrics",
    "configure_logging",
    "json_stderr_active",
    "mask_secrets",
    "redact_text",
]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_MASK = "***"
# Field names whose values are credentials. "token" only as a suffix ("access_token",
# "x-auth-token") so that counters such as "prompt_tokens" stay readable.
_SECRET_KEY = re.compile(r"authorization|api[_-]?key|secret|passw(?:or)?d|webhook|token$", re.IGNORECASE)
# key=value / key: value / "key": "value" where key names a secret; the value runs to a
# delimiter. "Bearer xyz" is masked as a whole.
_SECRET_PAIR = re.compile(
    r"""(?P<key>["']?[\w-]*(?:authorization|api[_-]?key|secret|passw(?:or)?d|token)["']?)"""
    r"""(?P<sep>\s*[:=]\s*)(?P<q>["']?)(?:(?:bearer|basic)\s+)?[^\s"',;&}]+""",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
# Incoming-webhook URLs carry their credential in the path.
_WEBHOOK_URL = re.compile(
    r"(https?://(?:hooks\.slack\.com|wh\.jandi\.com|[\w.-]*webhook[\w.:-]*))/\S+", re.IGNORECASE
)
_HANDLER_TAG = LOG_HANDLER_ATTR


# Every pattern above needs one of these words: a text without any (nearly every log field: ids, rpc names,
# model names, numbers) is returned after one search instead of three substitutions (which were 60 % of an
# access log line's cost, 154 us a line in all on the AMD EPYC measured).
_SUSPECT = re.compile(r"authorization|api[_-]?key|secret|passw|token|bearer|basic|webhook|hooks\.slack|jandi",
                      re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """Replace credential values (tokens, authorization headers, webhook URLs) with ``***``."""
    return mask_secrets_always(text) if _SUSPECT.search(text) else text


def mask_secrets_always(text: str) -> str:
    """:func:`mask_secrets` without the pre-check (``benchmarks/log_line.py`` times both)."""
    text = _WEBHOOK_URL.sub(rf"\1/{_MASK}", text)
    text = _SECRET_PAIR.sub(lambda m: f"{m.group('key')}{m.group('sep')}{m.group('q')}{_MASK}", text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {_MASK}", text)


class SecretMaskingFilter(logging.Filter):
    """Masks secrets in the formatted message, the traceback and in ``extra=`` fields.

    Attached to our *handlers* (not loggers): handler filters also see records that
    propagate from child loggers, logger filters would not.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        for key, value in list(vars(record).items()):
            if key in _RESERVED:
                continue
            if _SECRET_KEY.search(key):
                setattr(record, key, _MASK)
            elif isinstance(value, str):
                setattr(record, key, mask_secrets(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        return True


# What ends or rewrites a line where logs are read: C0 controls (newline, carriage return, ESC of terminal
# sequences), DEL, C1 controls (NEL, U+0085, ends a line for str.splitlines and some log shippers) and the Unicode
# line and paragraph separators. Client-chosen text reaches log lines (ReplyRequest.session_id, the HTTP body's
# "user", a model name): the human format shows these characters escaped, so one event stays one line and a
# client cannot forge lines or drive the operator's terminal.
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# json.dumps(ensure_ascii=False) escapes C0 controls but writes DEL, C1 controls, U+2028 and U+2029 as they are.
_JSON_LINE_BREAKING = re.compile(r"[\x7f-\x9f\u2028\u2029]")


def _escape_controls(text: str) -> str:
    return _LINE_BREAKING.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


# Where BackgroundLogHandler keeps the request and session ids of the thread that logged a record: the formatters
# run in its writer thread, where the contextvars hold nothing. Underscored, so never an extra field.
_IDS_ATTR = "_chatforge_ids"


def _ids(record: logging.LogRecord) -> tuple[str | None, str | None]:
    ids = getattr(record, _IDS_ATTR, None)
    return ids if ids is not None else (request_id_var.get(), session_id_var.get())


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, request_id, session_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        request_id, session_id = _ids(record)
        doc: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            "request_id": request_id,
            "session_id": session_id,
        }
        for key, value in _extras(record).items():
            # An explicit extra wins, also over the request/session ids read from the
            # contextvars (e.g. the client logs the id of a call it is not handling).
            # The fixed fields (time, level, ...) never come from extras, so they stay.
            if key in ("request_id", "session_id") and value is not None:
                doc[key] = value
            else:
                doc.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd extra (a Path, a dataclass) must not lose the whole event.
        line = json.dumps(doc, ensure_ascii=False, default=str)
        # Those characters only occur inside JSON strings, where \uXXXX is the same text: the line stays one line.
        return _JSON_LINE_BREAKING.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


class HumanFormatter(logging.Formatter):
    """``time LEVEL logger [req=… sess=…] event key=value …`` for terminals."""

    def format(self, record: logging.LogRecord) -> str:
        ids = []
        rid, sid = _ids(record)
        if rid is not None:
            ids.append(f"req={rid}")
        if sid is not None:
            ids.append(f"sess={sid}")
        parts = [_iso(record.created), f"{record.levelname:<7}", record.name]
        if ids:
            parts.append("[" + " ".join(ids) + "]")
        parts.append(record.getMessage())
        parts.extend(f"{k}={v}" for k, v in _extras(record).items())
        line = _escape_controls(" ".join(parts))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is *now* (pytest and daemons swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401 - property mirrors the attribute it replaces
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


# Records a server holds for its log writer while the sink (stderr, the log file) is slower than the server or has
# stopped taking lines; past this the newest are dropped and counted (some MB of records).
LOG_QUEUE_RECORDS = 10_000
# How long flush() and close() (at exit) wait for the writer to write what is queued.
LOG_DRAIN_TIMEOUT_S = 5.0


class _StderrFdWriter(_StderrHandler):
    """The stderr sink of a :class:`BackgroundLogHandler`: only its writer thread calls it, so no handler lock, and a
    line goes to the file descriptor with ``os.write`` when ``sys.stderr`` is the process's own. A writer blocked
    there (a pipe nobody reads) holds no lock of Python's: the process still exits (a blocked ``sys.stderr.write``
    holds the buffer's lock, which the interpreter needs at exit), and ``logging.shutdown`` still takes this
    handler's lock."""

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            stream = sys.stderr
            if stream is not sys.__stderr__ or stream is None:
                if stream is not None:
                    stream.write(line)
                    stream.flush()
                return
            fd = stream.fileno()
            data = line.encode(stream.encoding or "utf-8", "backslashreplace")
            stream.flush()  # what others left in its buffer goes first
            while data:
                try:
                    data = data[os.write(fd, data):]
                except BlockingIOError:  # someone made the descriptor non-blocking: wait until it takes bytes
                    select.select([], [fd], [], 1.0)
        except Exception:
            self.handleError(record)


class BackgroundLogHandler(logging.Handler):
    """Hands each record to one writer thread, which passes it to ``targets`` (stderr, the log file).

    A server that wrote its lines itself stopped serving when its sink stopped taking them (a pipe nobody reads, a
    terminal paused with Ctrl-S, a container log driver in blocking mode): the asyncio event loop waited in
    ``write`` and every call with it, health checks included. Here a stalled sink stalls the writer only. Records
    queue up to ``capacity``; past that the newest are dropped and counted (``dropped``), and the writer says how
    many in a warning line as soon as it writes again. Lines are formatted (JSON, secrets masked) in the writer
    thread, off the event loop and the decoding threads; what a record needs from the thread that logged it is
    taken in :meth:`emit`: its message with the arguments filled in, its traceback as text, the request and
    session ids. After :meth:`close`, records are written in the calling thread, as a plain handler would.
    """

    def __init__(self, targets: list[logging.Handler], *, capacity: int = LOG_QUEUE_RECORDS) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.targets = list(targets)
        self.capacity = capacity
        self.dropped = 0  # records dropped because the queue was full, since the start
        self._unreported = 0
        self._closed = False
        self._written = 0  # records the writer has finished with
        self._stalled = (-1, 0.0)  # (_written, seconds): how long waits timed out while the writer wrote nothing
        self._state = threading.Lock()
        self._queue: queue.Queue[logging.LogRecord | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="chatforge-log", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Records accepted and not yet written."""
        return self._queue.unfinished_tasks

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg, record.args = record.getMessage(), None
            if record.exc_info:
                if not record.exc_text:
                    record.exc_text = _TRACEBACKS.formatException(record.exc_info)
                record.exc_info = None  # the traceback holds every frame's locals alive until written
            setattr(record, _IDS_ATTR, (request_id_var.get(), session_id_var.get()))
        except Exception:
            self.handleError(record)
            return
        if self._closed:
            self._write(record)
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._state:
                self.dropped += 1
                self._unreported += 1

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            try:
                with self._state:
                    lost, self._unreported = self._unreported, 0
                if lost:
                    self._write(self._drop_record(lost))
                if record is None:
                    return
                self._write(record)
            finally:
                self._written += 1
                self._queue.task_done()

    def _write(self, record: logging.LogRecord) -> None:
        for target in self.targets:
            if record.levelno >= target.level:
                try:
                    target.handle(record)
                except Exception:  # a filter or formatter that raises must not end the writer
                    target.handleError(record)

    def _drop_record(self, lost: int) -> logging.LogRecord:
        record = logging.getLogger(__name__).makeRecord(
            __name__, logging.WARNING, __file__, 0,
            "log sink fell behind: %d log records dropped (the server holds %d waiting to be written); "
            "the server went on serving", (lost, self.capacity), None,
            extra={"log_records_dropped": lost, "log_records_dropped_total": self.dropped})
        record.msg, record.args = record.getMessage(), None
        setattr(record, _IDS_ATTR, (None, None))
        return record

    def flush(self, timeout: float = LOG_DRAIN_TIMEOUT_S) -> bool:
        """Wait (up to ``timeout`` s) until every record accepted so far is written; False if the sink did not
        take them in time."""
        if threading.current_thread() is self._thread:
            return False
        patience = self._patience(timeout)
        deadline = time.monotonic() + patience
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._timed_out(patience)
                    return False
                done.wait(left)
        return True

    def _patience(self, timeout: float) -> float:
        """``timeout`` less what earlier waits spent timing out while the writer wrote nothing: the server's own
        flush, then logging's flush and close at exit, wait for a stalled sink once in all, not three times."""
        written, waited = self._stalled
        return max(0.0, timeout - waited) if written == self._written else timeout

    def _timed_out(self, waited: float) -> None:
        written, before = self._stalled
        self._stalled = (self._written, (before if written == self._written else 0.0) + waited)

    def close(self, timeout: float = LOG_DRAIN_TIMEOUT_S) -> None:
        """Write what is queued (up to ``timeout`` s: a sink that takes nothing does not hold the process), stop the
        writer and close the targets it let go of."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        patience = self._patience(timeout)
        deadline = time.monotonic() + patience
        try:
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._timed_out(patience)
        else:
            for target in self.targets:
                target.close()
        super().close()


_TRACEBACKS = logging.Formatter()


def configure_logging(settings: Settings | None = None, *, logger: logging.Logger | None = None,
                      background: bool = False) -> list[logging.Handler]:
    """Install chatforge's handlers on ``logger`` (the root logger by default); idempotent.

    chatforge's own handlers (an earlier call's, and the CLI's console handler) are
    removed first, so calling twice, re-configuring with new settings, or serving from the
    CLI never writes an event twice; handlers installed by others (pytest's caplog, a host
    application) are left alone. Python warnings are routed through the same handlers
    (``logging.captureWarnings``), so in JSON mode every stderr line is a JSON object. The
    log file is only opened when production sinks are enabled (``env != "test"``).

    ``background`` (what a server runs with): one :class:`BackgroundLogHandler` in front of those handlers, so that
    a sink that stops taking lines never stops the server; returned alone (its ``targets`` are the sinks).
    """
    settings = settings or get_settings()
    target = logger or logging.getLogger()
    formatter: logging.Formatter = JsonFormatter() if settings.log_format == "json" else HumanFormatter()
    handlers: list[logging.Handler] = [_StderrFdWriter() if background else _StderrHandler()]
    handlers[0].setFormatter(formatter)
    if (path := settings.effective_log_file) is not None:
        # Opened before the current handlers are removed: a log file that cannot be written leaves them as they were.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=settings.log_file_max_bytes, backupCount=settings.log_file_backups, encoding="utf-8"
            )
        except OSError as e:
            # One line naming the variable (the bare OSError named neither it nor the log file); in the image the
            # root file system is read-only and /data and /tmp are the writable places.
            where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
            raise SettingsError(f"{Settings.env_var('log_file')}={path} cannot be written: "
                                f"{e.strerror or e}{where}; name a file in a writable folder") from None
        # Files are read by machines (log shippers): always JSON, whatever the terminal gets.
        file_handler.setFormatter(JsonFormatter())
        handlers.append(file_handler)
    for handler in handlers:
        handler.addFilter(SecretMaskingFilter())
    if background:
        handlers = [BackgroundLogHandler(handlers)]
    # Removed only now, once every new handler exists: no new handler can take the memory (and so the id) of one
    # it replaces.
    for handler in list(target.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            target.removeHandler(handler)
            handler.close()
    for handler in handlers:
        setattr(handler, _HANDLER_TAG, True)
        target.addHandler(handler)
    target.setLevel(settings.log_level)
    if target is logging.getLogger():
        logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" -> these handlers
    return handlers


def json_stderr_active(logger: logging.Logger | None = None) -> bool:
    """True when :func:`configure_logging` has put JSON lines on stderr (``CHATFORGE_LOG_FORMAT=json``): what
    is said to the operator from then on must be logged as an event, not printed as text."""
    target = logger or logging.getLogger()
    mine = [h for h in target.handlers if getattr(h, _HANDLER_TAG, False)]
    sinks = [t for h in mine for t in (h.targets if isinstance(h, BackgroundLogHandler) else [h])]
    return any(isinstance(h, _StderrHandler) and isinstance(h.formatter, JsonFormatter) for h in sinks)


def redact_text(text: str | None, settings: Settings | None = None) -> str:
    """What of a user message may appear in logs.

    By default only its length (privacy: user text is personal data); with
    ``log_user_text`` the first ``log_user_text_chars`` characters, secrets masked.
    """
    if text is None:
        return ""
    settings = settings or get_settings()
    if not settings.log_user_text:
        return f"<redacted {len(text)} chars>"
    limit = settings.log_user_text_chars
    shown = text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit} chars)"
    return mask_secrets(shown)
