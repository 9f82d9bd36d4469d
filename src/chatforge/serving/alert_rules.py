"""Threshold alert rules over a rolling window of finished calls: error rate and p99 latency.

The interceptor records every finished Chatbot call; the server evaluates the rules on a
timer (off the request path) and the AlertManager deduplicates what they raise, so a
sustained breach becomes one alert per window with a count, not one per evaluation.
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
# NOT_FOUND, UNAUTHENTICATED...) or its own cancel is not a reason to page anyone.
SERVER_FAULT_CODES = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                                "RESOURCE_EXHAUSTED", "DATA_LOSS"})


class RollingCallStats:
    """Finished calls of the last ``window_seconds``: latency and whether the server failed them."""

    def __init__(self, window_seconds: float = 60.0, *, clock: Callable[[], float] = time.monotonic,
                 max_calls: int = 100_000):
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        self.window, self.clock = window_seconds, clock
        self._calls: deque[tuple[float, float, bool]] = deque(maxlen=max_calls)
        self._lock = threading.Lock()

    def record(self, seconds: float, code: str) -> None:
        with self._lock:
            self._calls.append((self.clock(), seconds, code in SERVER_FAULT_CODES))

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
