"""Webhook alerts (Jandi or Slack incoming webhooks), deduplicated and sent off the request path.

Delivery model
--------------
An alert never blocks or fails the caller: ``alert_*`` methods only update an in-memory
bucket under a lock; a daemon thread POSTs with ``urllib`` and a timeout, and a failing
or slow webhook is logged, never raised.

Deduplication (critical: send the first at once, then aggregate; others: aggregate, then send once)
-------------------------------------------------------------------------------------------------
Alerts with the same key (for exceptions: type + file + line) are collected into one
bucket. The bucket opens at the first occurrence and is sent when ``window_seconds`` have
passed since then, as a single message saying how many times it happened; the next
occurrence after that opens a new bucket. A *critical* alert is not held that long: its
first occurrence is sent at once, and its bucket collects only the repeats, sent at the end
of the window as one follow-up ("49 more in 58 s"), or not at all when there were none. So a
crash loop that raises 50 identical exceptions in a window costs two POSTs, the first within
a tick, and a warning or info alert (a p99 breach, a health flip back to SERVING) one,
up to a window late (``window_seconds=0`` sends everything at once, no dedupe). :meth:`AlertManager.flush` sends every open bucket now (shutdown, tests);
:meth:`AlertManager.poll` sends the due ones (the worker calls it about every
``tick_seconds``). Time comes from an injectable ``clock`` so tests drive windows without
sleeping.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from chatforge.serving.observability import mask_secrets
from chatforge.settings import Settings

log = logging.getLogger(__name__)

AlertFormat = Literal["jandi", "slack"]
Severity = Literal["critical", "warning", "info"]
FORMATS = ("jandi", "slack")
JANDI_HEADERS = {"Accept": "application/vnd.tosslab.jandi-v2+json", "Content-Type": "application/json"}
SLACK_HEADERS = {"Content-Type": "application/json"}
_COLORS = {"critical": "#E01E5A", "warning": "#ECB22E", "info": "#2EB67D"}
_MAX_MESSAGE = 1000  # exception messages can embed whole inputs; keep alerts readable
_STOP = object()


@dataclass
class Alert:
    """One (possibly aggregated) alert; ``count`` occurrences since ``first_seen``."""

    key: Hashable
    title: str
    description: str
    severity: Severity = "critical"
    count: int = 1
    first_seen: float = 0.0
    last_seen: float = 0.0
    window_seconds: float = 0.0
    fields: dict[str, str] = field(default_factory=dict)
    # The repeats of a critical alert whose first occurrence was already sent: ``count`` counts only them
    follow_up: bool = False

    def headline(self, server_name: str) -> str:
        if self.follow_up:
            times = f" ({self.count} more)"
        else:
            times = f" (x{self.count})" if self.count > 1 else ""
        return f"[{server_name}] {self.severity.upper()}: {self.title}{times}"

    def full_description(self) -> str:
        text = self.description
        if self.follow_up:
            text += f"\noccurrences after the first (already sent): {self.count} in " \
                    f"{self.last_seen - self.first_seen:.0f}s (window {self.window_seconds:.0f}s)"
        elif self.count > 1:
            text += f"\noccurrences: {self.count} in {self.last_seen - self.first_seen:.0f}s " \
                    f"(window {self.window_seconds:.0f}s)"
        return text


def jandi_payload(alert: Alert, server_name: str) -> dict[str, Any]:
    """Jandi incoming-webhook body (send with :data:`JANDI_HEADERS`)."""
    return {
        "body": alert.headline(server_name),
        "connectColor": _COLORS[alert.severity],
        "connectInfo": [{"title": alert.title, "description": alert.full_description()}],
    }


def slack_escape(text: str) -> str:
    """``&``, ``<`` and ``>`` as Slack's HTML entities: Slack reads them as control characters in message text
    (``<!channel>`` notifies the whole channel, ``<url|text>`` is a link), and an exception message may quote what
    a client sent. https://api.slack.com/reference/surfaces/formatting#escaping"""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(alert: Alert, server_name: str) -> dict[str, Any]:
    """Slack incoming-webhook body: ``text`` fallback plus a coloured attachment of blocks."""
    headline = slack_escape(alert.headline(server_name))
    details = slack_escape(alert.full_description())
    if len(details) > 2900:  # Slack section text is capped at 3000 chars
        details = details[:2900]
        amp = details.rfind("&", -5)
        if amp >= 0 and ";" not in details[amp:]:
            details = details[:amp]  # never half an entity
    return {
        "text": headline,
        "attachments": [{
            "color": _COLORS[alert.severity],
            "fallback": headline,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*"}},
                {"type": "section", "text": {"type": "mrkdwn", "text": f"```{details}```"}},
            ],
        }],
    }


def exception_details(exc: BaseException) -> dict[str, str]:
    """Type, message, file, line, function and source line of the innermost raising frame."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    message = mask_secrets(str(exc))
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + "…"
    details = {"exception": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
               "message": message, "file": "<unknown>", "line": "0", "function": "", "source": ""}
    if frames:
        last = frames[-1]  # innermost: where it was actually raised
        details.update(file=last.filename, line=str(last.lineno), function=last.name,
                       source=mask_secrets((last.line or "").strip()))
    return details


class AlertManager:
    """Sends operational alerts to a Jandi or Slack incoming webhook.

    ``webhook_url=None`` disables delivery (alerts are only logged); that is what
    :meth:`from_settings` gives under ``CHATFORGE_ENV=test``. See the module docstring for
    the delivery and deduplication model.
    """

    def __init__(self, webhook_url: str | None, format: AlertFormat = "jandi", *, server_name: str,  # noqa: A002
                 timeout: float = 3.0, queue_size: int = 100, window_seconds: float = 60.0,
                 tick_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown alert format {format!r}; allowed: {', '.join(FORMATS)}")
        if webhook_url is not None and not webhook_url.startswith(("http://", "https://")):
            raise ValueError("alert webhook URL must start with http:// or https://")
        if timeout <= 0 or queue_size < 1 or window_seconds < 0 or tick_seconds <= 0:
            raise ValueError("timeout and tick_seconds must be > 0, queue_size >= 1, window_seconds >= 0")
        self._url, self.format, self.server_name = webhook_url, format, server_name
        self.timeout, self.window_seconds, self._tick, self._clock = timeout, window_seconds, tick_seconds, clock
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._pending: dict[Hashable, Alert] = {}
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._outstanding = 0  # promoted to the queue, not yet attempted
        self._closed = False
        self.sent = self.failed = self.dropped = 0
        self._thread: threading.Thread | None = None
        if webhook_url is not None:
            self._thread = threading.Thread(target=self._run, name="chatforge-alerts", daemon=True)
            self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> AlertManager:
        """Honours production-sink isolation: no webhook under ``env == "test"``."""
        kwargs.setdefault("server_name", settings.server_name)
        return cls(settings.effective_alert_webhook_url, settings.alert_format, **kwargs)

    @property
    def enabled(self) -> bool:
        return self._url is not None

    # -- raising alerts --------------------------------------------------------------------
    def alert(self, title: str, description: str, *, key: Hashable | None = None,
              severity: Severity = "critical") -> None:
        """Raise a generic alert; alerts sharing ``key`` (default: the title) are deduplicated."""
        try:
            self._submit(Alert(key=key if key is not None else ("alert", title), title=title,
                               description=f"server: {self.server_name}\n{description}", severity=severity))
        except Exception:  # an alert must never break the code path that raised it
            log.exception("could not queue alert")

    def alert_exception(self, exc: BaseException, *, rpc: str | None = None,
                        context: Mapping[str, Any] | None = None) -> None:
        """Alert on an unhandled exception; identical ones (type + file + line) collapse into one."""
        try:
            d = exception_details(exc)
            lines = [f"server: {self.server_name}", f"rpc: {rpc or '-'}",
                     f"exception: {d['exception']}: {d['message']}",
                     f"location: {d['file']}:{d['line']} in {d['function'] or '?'}",
                     f"source: {d['source'] or '<unavailable>'}"]
            lines += [f"{k}: {mask_secrets(str(v))}" for k, v in (context or {}).items()]
            where = f" in {rpc}" if rpc else ""
            self._submit(Alert(key=("exception", d["exception"], d["file"], d["line"]),
                               title=f"{d['exception']}{where}", description="\n".join(lines), fields=d))
        except Exception:
            log.exception("could not queue exception alert")

    def check_error_rate(self, errors: int, total: int, threshold: float) -> bool:
        """Alert (and return True) when ``errors / total`` exceeds ``threshold`` (a fraction)."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"error-rate threshold must be a fraction in [0, 1], got {threshold}")
        if errors < 0 or total < 0 or errors > total:
            raise ValueError(f"need 0 <= errors <= total, got errors={errors} total={total}")
        if total == 0 or errors / total <= threshold:
            return False
        self.alert("error rate above threshold",
                   f"errors: {errors} of {total} ({errors / total:.1%}); threshold {threshold:.1%}",
                   key=("error_rate",), severity="critical")
        return True

    def check_latency_p99(self, p99_seconds: float, threshold_seconds: float) -> bool:
        """Alert (and return True) when the p99 latency exceeds ``threshold_seconds``."""
        if threshold_seconds <= 0:
            raise ValueError(f"latency threshold must be > 0 seconds, got {threshold_seconds}")
        if p99_seconds <= threshold_seconds:
            return False
        self.alert("p99 latency above threshold",
                   f"p99: {p99_seconds * 1000:.0f} ms; threshold {threshold_seconds * 1000:.0f} ms",
                   key=("latency_p99",), severity="warning")
        return True

    def model_load_failed(self, name: str, exc: BaseException) -> None:
        d = exception_details(exc)
        self.alert(f"model {name!r} failed to load",
                   f"model: {name}\nexception: {d['exception']}: {d['message']}\n"
                   f"location: {d['file']}:{d['line']}\nsource: {d['source'] or '<unavailable>'}",
                   key=("model_load", name, d["exception"]), severity="critical")

    def model_directory_problem(self, name: str, message: str) -> None:
        """A model of the model directory cannot be resolved (a pin naming a missing version, an unreadable
        ``PINNED`` file): it keeps serving what it served, and the operator's change is not applied."""
        self.alert(f"model directory: {name or '<directory>'!s} cannot be resolved",
                   f"model: {name or '<directory>'}\nproblem: {message}",
                   key=("model_directory", name, message), severity="warning")

    def watcher_stopped(self, root: str, reason: BaseException | None) -> None:
        """The model directory watcher's thread ended: this replica no longer follows the directory."""
        self.alert("model directory watcher stopped",
                   f"directory: {root}\nreason: {reason!r}\nliveness is now NOT_SERVING, so the replica is restarted",
                   key=("watcher_stopped", root), severity="critical")

    def health_changed(self, service: str, status: str, *, reason: str | None = None) -> None:
        """Health of ``service`` became ``status`` (gRPC health names: SERVING, NOT_SERVING…).

        ``reason`` says the server changed it on purpose (a drain: SIGTERM on a deploy or scale-down): that is
        info, like SERVING; any other non-SERVING status is critical."""
        planned = reason is not None
        severity: Severity = "info" if status.upper() == "SERVING" or planned else "critical"
        description = f"service: {service or '<server>'}\nstatus: {status}" + (f"\nreason: {reason}" if planned else "")
        self.alert(f"health of {service or '<server>'} is {status}", description,
                   key=("health", service, status, planned), severity=severity)

    # -- aggregation and delivery ----------------------------------------------------------
    def _submit(self, alert: Alert) -> None:
        log.debug("alert raised", extra={"alert": alert.title})
        if self._url is None or self._closed:
            if self._closed:
                log.warning("alert after close() dropped", extra={"alert": alert.title})
            return
        now = self._clock()
        with self._lock:
            bucket = self._pending.get(alert.key)
            if bucket is None:
                alert.first_seen = alert.last_seen = now
                alert.window_seconds = self.window_seconds
                if alert.severity == "critical" and self.window_seconds > 0:
                    # Sent now; its repeats within the window collect in a follow-up bucket
                    self._pending[alert.key] = replace(alert, count=0, follow_up=True)
                    self._enqueue(alert)
                else:
                    self._pending[alert.key] = alert
            else:
                bucket.count += 1
                bucket.last_seen = now
        self.poll()

    def _enqueue(self, alert: Alert) -> bool:
        """Queue ``alert`` for the worker (the caller holds the lock); False when the queue is full."""
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.dropped += 1
            log.warning("alert queue full; alert dropped", extra={"alert": alert.title})
            return False
        self._outstanding += 1
        return True

    def poll(self) -> int:
        """Queue for sending every bucket whose window has elapsed; returns how many."""
        return self._promote(force=False)

    def _promote(self, *, force: bool) -> int:
        now = self._clock()
        promoted = 0
        with self._lock:
            for key in list(self._pending):
                alert = self._pending[key]
                if not force and now - alert.first_seen < self.window_seconds:
                    continue
                del self._pending[key]
                if alert.follow_up and alert.count == 0:
                    continue  # a critical alert that did not repeat: its first occurrence said it all
                if self._enqueue(alert):
                    promoted += 1
        return promoted

    def flush(self, timeout: float = 10.0) -> bool:
        """Send every open bucket now and wait until each was attempted; False on timeout."""
        if self._url is None:
            return True
        self._promote(force=True)
        deadline = time.monotonic() + timeout
        with self._done:
            while self._outstanding > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Flush, then stop the worker, within ``timeout`` seconds in all. Later alerts are logged and dropped.

        What a hanging webhook left unsent by then is dropped (counted in ``dropped``), not posted one
        ``self.timeout`` at a time: a shutdown must end within its grace period whatever the webhook does."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._closed = True
        if self._thread is None:
            return
        unsent = 0
        with self._done:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
                unsent += 1
                self._outstanding -= 1
            self.dropped += unsent
            self._done.notify_all()
        if unsent:
            log.warning("%d alert(s) not sent before close: the webhook did not answer in time", unsent,
                        extra={"dropped": unsent})
        self._queue.put_nowait(_STOP)  # the queue was just emptied: the worker stops after its current POST
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> AlertManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._tick)
            except queue.Empty:
                self.poll()
                continue
            if item is _STOP:
                return
            try:
                self._post(item)
            finally:
                with self._done:
                    self._outstanding -= 1
                    self._done.notify_all()

    def payload(self, alert: Alert) -> tuple[dict[str, Any], dict[str, str]]:
        """The JSON body and headers for ``alert`` in this manager's format."""
        if self.format == "jandi":
            return jandi_payload(alert, self.server_name), JANDI_HEADERS
        return slack_payload(alert, self.server_name), SLACK_HEADERS

    def _post(self, alert: Alert) -> None:
        assert self._url is not None
        body, headers = self.payload(alert)
        request = urllib.request.Request(self._url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - http(s) only
                response.read()
        except Exception as e:  # HTTPError, URLError, timeouts: all logged, none raised
            self.failed += 1
            # The URL is a credential: log the error only, never the request.
            log.warning("alert webhook delivery failed",
                        extra={"alert": alert.title, "error": mask_secrets(f"{type(e).__name__}: {e}")})
            return
        self.sent += 1
        log.info("alert sent", extra={"alert": alert.title, "count": alert.count})
