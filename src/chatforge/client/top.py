"""Resource monitoring from a server's /metrics endpoint (what ``chatforge top`` shows).

The server already exports its process metrics (CPU seconds, RSS, open fds, threads,
GPU memory) and queue gauges through :class:`~chatforge.serving.metrics.ServingMetrics`;
this module scrapes that endpoint over plain HTTP and turns two consecutive scrapes into
rates (CPU %, requests/s). Nothing runs inside the server, so it works against any
replica, in a container or behind a firewall that only opens the metrics port.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)


class MonitorError(RuntimeError):
    """The metrics endpoint could not be read or parsed; the message names the URL."""


@dataclass
class ResourceSample:
    """One scrape. Counters are cumulative; the ``*_per_s``/``cpu_percent`` fields are rates
    since the previous sample of the same monitor (None for the first)."""

    time: float
    cpu_seconds: float | None = None
    cpu_percent: float | None = None
    rss_bytes: float | None = None
    open_fds: float | None = None
    threads: float | None = None
    gpu_allocated_bytes: float | None = None
    gpu_reserved_bytes: float | None = None
    requests_running: float = 0.0
    requests_waiting: float = 0.0
    requests_total: float = 0.0
    requests_per_s: float | None = None
    errors_total: float = 0.0
    generation_tokens_total: float = 0.0
    tokens_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(e: BaseException, limit: int = 40) -> str:
    """An exception's text on one short line; escaped when it is not printable (BadStatusLine holds the raw bytes
    that came back: HTTP/2 frames from a gRPC port)."""
    text = str(e)
    text = " ".join(text.split()) if text.isprintable() else ascii(text)
    return text if len(text) <= limit else text[:limit] + "..."


def metrics_url(target: str) -> str:
    """``HOST:PORT`` or a URL -> the /metrics URL."""
    url = target if target.startswith(("http://", "https://")) else f"http://{target}"
    if "://" in url and "/" not in url.split("://", 1)[1]:
        url += "/metrics"
    return url


def parse_metrics(text: str, namespace: str = "chatforge") -> dict[str, Any]:
    """Prometheus text -> the fields of :class:`ResourceSample` (absolute values, no rates).

    Samples are summed over their labels (all models, all GPUs): ``top`` shows the process.
    """
    p = f"{namespace}_" if namespace else ""
    sums: dict[str, float] = {}
    ok_requests = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            sums[s.name] = sums.get(s.name, 0.0) + s.value
            if s.name == f"{p}requests_total" and s.labels.get("status") == "OK":
                ok_requests += s.value

    def get(name: str) -> float | None:
        return sums.get(p + name)

    total = get("requests_total") or 0.0
    return {
        # prometheus-client exposes the CPU counter with the _total suffix.
        "cpu_seconds": get("process_cpu_seconds_total") if get("process_cpu_seconds_total") is not None
        else get("process_cpu_seconds"),
        "rss_bytes": get("process_resident_memory_bytes"),
        "open_fds": get("process_open_fds"),
        "threads": get("process_threads"),
        "gpu_allocated_bytes": get("gpu_memory_allocated_bytes"),
        "gpu_reserved_bytes": get("gpu_memory_reserved_bytes"),
        "requests_running": get("requests_running") or 0.0,
        "requests_waiting": get("requests_waiting") or 0.0,
        "requests_total": total,
        "errors_total": total - ok_requests,
        "generation_tokens_total": get("generation_tokens_total") or 0.0,
    }


class ResourceMonitor:
    """Scrapes ``url`` (``HOST:PORT`` or a /metrics URL) and returns :class:`ResourceSample` s.

    ``sample()`` scrapes once; ``watch(count)`` yields a sample every ``interval`` seconds
    (forever when ``count`` is None). Rates need two samples, so the first has none.
    """

    def __init__(self, url: str, *, interval: float = 2.0, timeout: float = 5.0, namespace: str = "chatforge",
                 api_key: str | None = None, ca_file: str | Path | None = None) -> None:
        if not interval > 0:
            raise ValueError(f"interval={interval!r} is out of range; allowed: seconds > 0")
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key is empty; allowed: a non-empty key or None")
        self.url = metrics_url(url)
        self.interval, self.timeout, self.namespace = interval, timeout, namespace
        # Sent with every scrape, for a metrics endpoint behind an authenticating proxy. Kept
        # private and out of repr: it is a secret.
        self._headers = {"Authorization": f"Bearer {api_key.strip()}"} if api_key else {}
        self._ssl = None
        if ca_file is not None:
            try:
                self._ssl = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"cannot use {ca_file} as a CA certificate: {e}") from None
        self._previous: ResourceSample | None = None

    def __repr__(self) -> str:
        return f"ResourceMonitor({self.url!r})"

    def scrape(self) -> str:
        request = urllib.request.Request(self.url, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._ssl) as r:
                return r.read().decode("utf-8")
        except urllib.error.HTTPError as e:  # it answered: say with what (401 behind a proxy, 404 on another path)
            raise MonitorError(f"cannot read metrics from {self.url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            text = getattr(reason, "strerror", None) or str(reason)  # "Connection refused", not "<urlopen error ...>"
            raise MonitorError(f"cannot read metrics from {self.url}: {text} (is a server running there with "
                               "--metrics-port?)") from None
        except (http.client.HTTPException, UnicodeDecodeError) as e:
            # Something answered, but not HTTP/1 text: a gRPC port (HTTP/2 frames: BadStatusLine), a TLS port, ...
            raise MonitorError(f"cannot read metrics from {self.url}: it did not answer as a metrics endpoint "
                               f"({type(e).__name__}: {_short(e)}); give the server's metrics port "
                               "(serve --metrics-port, CHATFORGE_METRICS_PORT), not its gRPC or HTTP API port"
                               ) from None

    def sample(self) -> ResourceSample:
        text = self.scrape()
        now = time.monotonic()
        try:
            fields = parse_metrics(text, self.namespace)
        except ValueError as e:
            raise MonitorError(f"{self.url} did not answer Prometheus text format: {e}") from None
        s = ResourceSample(time=now, **fields)
        prev = self._previous
        if prev is not None and now > prev.time:
            dt = now - prev.time
            if s.cpu_seconds is not None and prev.cpu_seconds is not None:
                s.cpu_percent = max(0.0, (s.cpu_seconds - prev.cpu_seconds) / dt * 100.0)
            s.requests_per_s = max(0.0, (s.requests_total - prev.requests_total) / dt)
            s.tokens_per_s = max(0.0, (s.generation_tokens_total - prev.generation_tokens_total) / dt)
        self._previous = s
        return s

    def watch(self, count: int | None = None) -> Iterator[ResourceSample]:
        n = 0
        while count is None or n < count:
            if n:
                time.sleep(self.interval)
            yield self.sample()
            n += 1


def summarize_samples(first: ResourceSample | None, samples: list[ResourceSample]) -> dict[str, Any]:
    """The server section of a load-test report: peak/mean resources and counter deltas."""
    samples = [s for s in samples if s is not None]
    if first is None or not samples:
        return {}
    last = samples[-1]

    def peak(name: str) -> float | None:
        vals = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        return max(vals) if vals else None

    cpu = [s.cpu_percent for s in samples if s.cpu_percent is not None]
    dt = last.time - first.time
    cpu_mean = None
    if last.cpu_seconds is not None and first.cpu_seconds is not None and dt > 0:
        cpu_mean = (last.cpu_seconds - first.cpu_seconds) / dt * 100.0
    return {
        "samples": len(samples),
        "cpu_percent_mean": cpu_mean,
        "cpu_percent_max": max(cpu) if cpu else cpu_mean,
        "rss_bytes_max": peak("rss_bytes"),
        "open_fds_max": peak("open_fds"),
        "threads_max": peak("threads"),
        "gpu_allocated_bytes_max": peak("gpu_allocated_bytes"),
        "requests_waiting_max": peak("requests_waiting"),
        "requests_running_max": peak("requests_running"),
        # The server's own count of what this run sent: should equal the report's count.
        "requests_delta": last.requests_total - first.requests_total,
        "errors_delta": last.errors_total - first.errors_total,
        "generation_tokens_delta": last.generation_tokens_total - first.generation_tokens_total,
    }
