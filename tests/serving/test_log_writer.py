"""The server's log writer (``BackgroundLogHandler``): a log sink that stops taking lines stalls one writer thread,
never the thread that logged; nothing queued is lost; what a full queue drops is counted and said; each line is
what the direct handlers write, formatted in the writer thread with the logging thread's request and session ids.
The served process itself, with a stderr nobody reads, is tests/scenarios/test_blocked_log_sink.py."""

from __future__ import annotations

import json
import logging
import re
import threading

import pytest
from prometheus_client import generate_latest

from chatforge.context import request_id_var, session_id_var
from chatforge.serving.metrics import ServingMetrics
from chatforge.serving.observability import (
    BackgroundLogHandler,
    JsonFormatter,
    configure_logging,
    json_stderr_active,
)
from chatforge.settings import Settings

WAIT = 30.0


class _Sink(logging.Handler):
    """A sink that takes lines only while ``open`` is set (a pipe nobody reads, until someone does)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.open = threading.Event()
        self.entered = threading.Event()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entered.set()
        assert self.open.wait(WAIT), "the test never opened the sink"
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture()
def logger(isolated_logger):
    isolated_logger.setLevel(logging.INFO)
    return isolated_logger


def _log_in_thread(fn) -> None:
    """Run ``fn`` in a thread and fail (instead of hanging) if it does not return: logging must never wait for the sink."""
    done = threading.Event()

    def run():
        fn()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(WAIT), "logging waited for a sink that takes no lines"


def test_a_stalled_sink_holds_only_the_writer_and_a_full_queue_is_counted_and_said(logger):
    sink = _Sink()
    writer = BackgroundLogHandler([sink], capacity=5)
    logger.addHandler(writer)
    logger.info("line %d", 0)
    assert sink.entered.wait(WAIT)  # the writer is inside the sink's write, which does not return
    _log_in_thread(lambda: [logger.info("line %d", i) for i in range(1, 20)])
    assert writer.dropped == 14 and writer.pending == 6  # line 0 being written, 1-5 queued, 6-19 dropped
    assert writer.flush(timeout=0.05) is False  # nothing can be written yet, and flush says so
    sink.open.set()
    assert writer.flush(timeout=WAIT)
    events = [line["event"] for line in sink.lines]
    assert events[0] == "line 0" and events[2:] == [f"line {i}" for i in range(1, 6)]
    said = sink.lines[1]
    assert said["level"] == "WARNING" and said["log_records_dropped"] == 14 and "14 log records dropped" in said["event"]
    assert writer.pending == 0


def test_each_line_is_what_the_direct_handlers_write(logger, capsys):
    """Same settings, same records: the JSON lines through the writer equal the direct handler's (times aside),
    including request/session ids set in the logging thread, an explicit request_id extra, %-arguments changed
    after the call, a traceback, and secrets masked."""

    def emit_all() -> None:
        rid, sid = request_id_var.set("req-7"), session_id_var.set("sess-3")
        try:
            items = ["a"]
            logger.info("items %s", items, extra={"model": "chat", "api_key": "sk-123"})
            items.append("b")  # after the call: the line says what was logged
            logger.warning("Authorization: Bearer abc.def", extra={"request_id": "other-req"})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        finally:
            request_id_var.reset(rid)
            session_id_var.reset(sid)
        logger.info("outside any request")

    def lines(background: bool) -> list[dict]:
        [handler] = configure_logging(Settings(env="test", log_format="json"), logger=logger, background=background)
        emit_all()
        if background:
            assert isinstance(handler, BackgroundLogHandler)
            assert handler.flush(timeout=WAIT)
        out = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
        return [{k: v for k, v in line.items() if k != "time"} for line in out]

    direct, queued = lines(False), lines(True)
    assert queued == direct and len(direct) == 4
    assert direct[0]["event"] == "items ['a']" and direct[0]["request_id"] == "req-7"
    assert direct[0]["session_id"] == "sess-3" and direct[0]["api_key"] == "***"
    assert direct[1]["request_id"] == "other-req" and "abc.def" not in direct[1]["event"]
    assert "ValueError: boom" in direct[2]["exc"] and direct[3]["request_id"] is None


def test_the_record_keeps_no_traceback_frames(logger):
    """The queued record holds the traceback as text, not the frames (and their locals) until it is written."""
    sink = _Sink()
    writer = BackgroundLogHandler([sink])
    logger.addHandler(writer)
    logger.info("first")
    assert sink.entered.wait(WAIT)
    try:
        raise RuntimeError("kept as text")
    except RuntimeError:
        logger.exception("failed")
    queued = list(writer._queue.queue)
    assert len(queued) == 1 and queued[0].exc_info is None and "RuntimeError: kept as text" in queued[0].exc_text
    sink.open.set()
    assert writer.flush(timeout=WAIT)
    assert "RuntimeError: kept as text" in sink.lines[1]["exc"]


def test_flush_and_close_wait_for_a_stalled_sink_once_in_all(logger):
    """The server's own flush, then logging's flush and close at exit: a sink that takes nothing costs one timeout in
    all, after which the process may exit (the writer is a daemon thread)."""
    sink = _Sink()
    writer = BackgroundLogHandler([sink])
    logger.addHandler(writer)
    logger.info("stuck")
    assert sink.entered.wait(WAIT)
    assert writer.flush(timeout=0.2) is False
    assert writer._patience(0.2) == 0.0 and writer._patience(0.5) == pytest.approx(0.3, abs=0.01)
    assert writer.flush(timeout=0.2) is False
    _log_in_thread(lambda: writer.close(timeout=0.2))
    assert writer._thread.is_alive() and writer._thread.daemon
    sink.open.set()  # the sink takes lines again: the writer writes what it held and stops at close's marker
    writer._thread.join(WAIT)
    assert not writer._thread.is_alive() and [line["event"] for line in sink.lines] == ["stuck"]


def test_close_writes_what_is_queued_and_later_records_directly(logger):
    sink = _Sink()
    sink.open.set()
    writer = BackgroundLogHandler([sink])
    logger.addHandler(writer)
    for i in range(50):
        logger.info("queued %d", i)
    writer.close(timeout=WAIT)
    assert [line["event"] for line in sink.lines] == [f"queued {i}" for i in range(50)]
    logger.info("after close")  # at exit logging goes on: written by the caller now
    assert sink.lines[-1]["event"] == "after close"


def test_configure_logging_in_the_background_keeps_its_sinks_and_formats(logger, tmp_path):
    [writer] = configure_logging(Settings(env="production", log_format="json", log_file=tmp_path / "s.log"),
                                 logger=logger, background=True)
    assert isinstance(writer, BackgroundLogHandler) and len(writer.targets) == 2
    assert json_stderr_active(logger)
    [again] = configure_logging(Settings(env="test", log_format="human"), logger=logger, background=True)
    assert writer._closed and not writer._thread.is_alive()  # the replaced writer was drained and stopped
    ours = [h for h in logger.handlers if getattr(h, "_chatforge_handler", False)]
    assert not json_stderr_active(logger) and ours == [again]


def test_metrics_export_the_writers_queue(logger):
    sink = _Sink()
    writer = BackgroundLogHandler([sink], capacity=3)
    logger.addHandler(writer)
    metrics = ServingMetrics(process_metrics=False)
    metrics.watch_logs(writer)
    logger.info("stuck")
    assert sink.entered.wait(WAIT)
    for i in range(6):
        logger.info("more %d", i)
    text = generate_latest(metrics.registry).decode()
    assert re.search(r"^chatforge_log_pending_records 4\.0$", text, re.M)
    assert re.search(r"^chatforge_log_dropped_records_total 3\.0$", text, re.M)
    sink.open.set()
    assert writer.flush(timeout=WAIT)
    assert re.search(r"^chatforge_log_pending_records 0\.0$", generate_latest(metrics.registry).decode(), re.M)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        BackgroundLogHandler([], capacity=0)


def test_the_handlers_a_reconfiguration_makes_exist_before_the_ones_it_replaces_are_let_go(logger, monkeypatch):
    """`chatforge serve` tells a start-up failure after its logging is set up from one before by the root's handlers.
    When configure_logging removed (and so freed) the CLI's handler before making the log writer, the writer could get
    the freed handler's memory and so its id (2 times in 50 in a loop here), and the failure came out as a plain text
    line in JSON mode (tests/serving/test_serve_start_failure_json.py failed in CI that way; the CLI now keeps the
    handlers themselves, not their ids). The new handlers are made first: the old one is closed after the writer
    exists."""
    from rich.logging import RichHandler

    from chatforge.serving import observability
    from chatforge.settings import LOG_HANDLER_ATTR

    events: list[str] = []
    made = observability.BackgroundLogHandler.__init__

    def init(self, *a, **kw):
        made(self, *a, **kw)
        events.append("writer made")

    class Old(RichHandler):
        def close(self):
            events.append("old closed")
            super().close()

    monkeypatch.setattr(observability.BackgroundLogHandler, "__init__", init)
    old = Old()
    setattr(old, LOG_HANDLER_ATTR, True)  # as the CLI tags its console handler
    logger.addHandler(old)
    configure_logging(Settings(env="test", log_format="json"), logger=logger, background=True)
    assert events == ["writer made", "old closed"]


def test_a_replacement_handler_never_takes_the_id_of_the_handler_it_replaces(logger):
    """The same, as it showed: a replaced handler held only by the logger, replaced 1,000 times; no writer ever has the
    id of the handler it replaced."""
    from rich.logging import RichHandler

    from chatforge.settings import LOG_HANDLER_ATTR

    reused = 0
    for _ in range(1000):
        old = RichHandler()
        setattr(old, LOG_HANDLER_ATTR, True)
        logger.addHandler(old)
        before = {id(h) for h in logger.handlers}
        del old  # only the logger holds it, as in the CLI
        [new] = configure_logging(Settings(env="test", log_format="json"), logger=logger, background=True)
        reused += id(new) in before
        logger.removeHandler(new)
        new.close()
    assert reused == 0
