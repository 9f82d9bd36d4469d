"""Threshold alert rules over a rolling window of finished calls: error rate and p99 latency.

The interceptor records every finished Chatbot call; the server evaluates the rules on a
timer (off the request path) and the AlertManager deduplicates what they raise, so a
sustained breach becomes one alert per window with a count, not one per evaluation.

A DEADLINE_EXCEEDED is the server's fault only when the caller gave it at least the latency budget, the p99
latency the server is alerted on (``AlertRules.p99_seconds``, ``CHATFORGE_ALERT_P99_MS``): the server promises to
answer within that time, not within whatever a caller asks. A call that reached the server with less time left (a
client with a 1 ms deadline) failed on its own terms, and is not a reason to page anyone; a call with no deadline
that still ends DEADLINE_EXCEEDED was timed out by the server itself, and counts (:func:`is_server_fault`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Failures that are the server's to answer for; a caller's bad input (INVALID_ARGUMENT,
# NOT_FOUND, UNAUTHENTICATED...) or its own cancel is not a reason to page anyone. DEADLINE_EXCEEDED only when
# the caller allowed at least the latency budget (is_server_fault).
SERVER_FAULT_CODES = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                                "RESOURCE_EXHAUSTED", "DATA_LOSS"})


def is_server_fault(code: str, deadline_seconds: float | None, latency_budget: float = 0.0) -> bool:
    """Whether a call that ended with ``code`` is the server's failure. ``deadline_seconds``: the time the caller's
    deadline left the call when it reached the server (None: no deadline). A DEADLINE_EXCEEDED counts only when
    that was at least ``latency_budget`` seconds, or there was no deadline (the server timed the call out)."""
    if code not in SERVER_FAULT_CODES:
        return False
    if code == "DEADLINE_EXCEEDED" and deadline_seconds is not None:
        return deadline_seconds >= latency_budget
    return True


class RollingCallStats:
    """Finished calls of the last ``window_seconds``: latency and whether the server failed them.

    ``latency_budget``: the shortest deadline whose DEADLINE_EXCEEDED is the server's fault (:func:`is_server_fault`);
    :class:`AlertRules` sets it to its ``p99_seconds`` when it is left None (0: every deadline counts).
    """

    def __init__(self, window_seconds: float = 60.0, *, clock: Callable[[], float] = time.monotonic,
                 max_calls: int = 100_000, latency_budget: float | None = None):
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        if latency_budget is not None and not latency_budget >= 0:
            raise ValueError(f"latency_budget must be seconds >= 0 or None, got {latency_budget}")
        self.window, self.clock = window_seconds, clock
        self.latency_budget = latency_budget
        self._calls: deque[tuple[float, float, bool]] = deque(maxlen=max_calls)
        self._lock = threading.Lock()

    def is_server_fault(self, code: str, deadline_seconds: float | None = None) -> bool:
        """:func:`is_server_fault` with this window's latency budget."""
        return is_server_fault(code, deadline_seconds, self.latency_budget or 0.0)

    def record(self, seconds: float, code: str, deadline_seconds: float | None = None) -> None:
        """One finished call: its latency, status code name and the time its deadline left it on arrival."""
        failed = self.is_server_fault(code, deadline_seconds)
        with self._lock:
            self._calls.append((self.clock(), seconds, failed))

    def snapshot(self) -> tuple[int, int, float | None]:
        """(calls, server failures, p99 latency in seconds or None) over the window."""
        cutoff = self.clock() - self.window
        with self._lock:
            while self._calls and self._calls[0][0] < cutoff:
                self._calls.popleft()
            calls = list(self._calls)
        if not calls:
            return 0, 0, None
        latencies = sorted(s for _, s, _ in calls)
        p99 = latencies[max(0, math.ceil(0.99 * len(latencies)) - 1)]  # nearest rank: a latency that happened
        return len(calls), sum(1 for *_, failed in calls if failed), p99


@dataclass
class AlertRules:
    """Evaluate the thresholds on ``stats`` and raise alerts through ``alerts`` (an AlertManager)."""

    alerts: object
    stats: RollingCallStats
    error_rate: float = 0.05
    p99_seconds: float = 5.0
    min_calls: int = 20  # below this a window says too little to page anyone

    def __post_init__(self):
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be a fraction in [0, 1], got {self.error_rate}")
        if self.p99_seconds <= 0:
            raise ValueError(f"p99_seconds must be > 0, got {self.p99_seconds}")
        if self.stats.latency_budget is None:  # the latency the server promises is the one it is alerted on
            self.stats.latency_budget = self.p99_seconds

    def check(self) -> list[str]:
        """Return the names of the rules that fired (and alerted) on the current window."""
        total, errors, p99 = self.stats.snapshot()
        if total < self.min_calls:
            return []
        fired = []
        if self.alerts.check_error_rate(errors, total, self.error_rate):
            fired.append("error_rate")
        if p99 is not None and self.alerts.check_latency_p99(p99, self.p99_seconds):
            fired.append("latency_p99")
        if fired:
            logger.warning("alert rules fired: %s", ", ".join(fired),
                           extra={"calls": total, "errors": errors, "p99_ms": round((p99 or 0) * 1000, 1)})
        return fired
