"""Load testing a chatforge server: closed- or open-loop traffic, a ghz-style report, SLO gates.

The bar is ghz (https://ghz.sh/docs/output): count, total time, throughput, latency
mean/min/max and percentiles, a latency histogram and the status-code distribution.
On top of that, streams report time to first token (TTFT) and tokens per second, the
two numbers users feel in a chat UI, and ``--sweep`` repeats the run at several
concurrency levels to find the knee of the throughput/latency curve.

How traffic is made: ``concurrency`` worker threads share ``connections`` channels
(:class:`~chatforge.client.channel.ChatbotClient` instances, worker ``i`` uses channel
``i % connections``). Blocking gRPC calls release the GIL while waiting, so threads cost
little on a 2-core machine and need no second event loop next to the server's. Each
worker takes the next *ticket* from a shared dispenser, which ends the run after
``requests`` tickets or ``duration`` seconds (whichever is given), and, with ``rps``, holds
each ticket until its slot on a fixed schedule (open loop: ``start_i = t0 + i / rps``).
The client's automatic retries are off by default: a load test must see every
UNAVAILABLE the server returns instead of hiding it behind a backoff.

Percentiles use the nearest-rank method (the smallest observed value with at least q%
of the samples at or below it), so every reported latency is one that really happened.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.client.http import HttpChatClient, HttpChatError
from chatforge.client.top import ResourceMonitor, summarize_samples
from chatforge.context import LOADTEST_TRAFFIC, TRAFFIC_METADATA_KEY
from chatforge.data import DataError, read_examples, sample_corpus_path
from chatforge.fileio import atomic_writer

logger = logging.getLogger(__name__)

RPCS = ("reply", "classify", "health")
PROTOCOLS = ("grpc", "http")  # http: the OpenAI-compatible surface (serving/http.py), streamed
PERCENTILES = (50, 90, 95, 99)
HISTOGRAM_BUCKETS = 10
# Enough distinct messages to avoid measuring a cache, few enough to load instantly.
MAX_TEXTS = 10_000
# What the report's "tokens" count (its "counted" field says so in every JSON report).
TOKENS_COUNTED = ("tokens the model generated, as the server reported them (completion_tokens); scripted, "
                  "retrieval and fallback replies generate none")


class LoadTestError(ValueError):
    """Bad load-test input (options, SLO syntax, data file); the message says what is allowed."""


# ----------------------------------------------------------------------------- config
@dataclass
class LoadTestConfig:
    """What to send, how hard and for how long. Exactly one of ``requests``/``duration``."""

    target: str
    rpc: str = "reply"
    concurrency: int = 1
    requests: int | None = None
    duration: float | None = None
    rps: float | None = None
    connections: int = 1
    texts: list[str] = field(default_factory=list)
    model: str | None = None
    timeout: float = 30.0
    max_new_tokens: int | None = None
    retries: bool = False
    metrics_url: str | None = None  # the server's metrics endpoint, for the resource section
    # Credentials, passed to ChatbotClient as they are; the key is kept out of repr (and so out of logs).
    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    protocol: str = "grpc"

    def validate(self) -> LoadTestConfig:
        if self.protocol not in PROTOCOLS:
            raise LoadTestError(f"protocol={self.protocol!r} is unknown; allowed: {', '.join(PROTOCOLS)}")
        if self.rpc not in RPCS:
            raise LoadTestError(f"rpc={self.rpc!r} is unknown; allowed: {', '.join(RPCS)}")
        if (self.requests is None) == (self.duration is None):
            raise LoadTestError("give exactly one of requests (--requests N) or duration (--duration S)")
        if self.requests is not None and self.requests < 1:
            raise LoadTestError(f"requests={self.requests} is out of range; allowed: an integer >= 1")
        if self.duration is not None and not self.duration > 0:
            raise LoadTestError(f"duration={self.duration} is out of range; allowed: seconds > 0")
        if self.concurrency < 1:
            raise LoadTestError(f"concurrency={self.concurrency} is out of range; allowed: an integer >= 1")
        if self.connections < 1:
            raise LoadTestError(f"connections={self.connections} is out of range; allowed: an integer >= 1")
        if self.rps is not None and not self.rps > 0:
            raise LoadTestError(f"rps={self.rps} is out of range; allowed: requests per second > 0")
        if not 0 < self.timeout < math.inf:  # an infinite deadline failed every call at once
            raise LoadTestError(f"timeout={self.timeout} is out of range; allowed: a finite number of seconds > 0")
        if self.rpc != "health" and not self.texts:
            raise LoadTestError(f"rpc={self.rpc!r} needs input texts; none were given")
        if ":" not in self.target:
            raise LoadTestError(f"target={self.target!r} is invalid; allowed: HOST:PORT, e.g. 127.0.0.1:50051")
        return self


def load_texts(path: str | os.PathLike[str] | None = None, *, limit: int = MAX_TEXTS) -> list[str]:
    """User messages from any corpus file ``chatforge.data.read_examples`` reads (default: the sample corpus).

    Realistic inputs matter: latency grows with prompt length and the reply a model
    chooses, so a load test with one fixed "hello" under-reports both.
    """
    source = Path(path) if path is not None else sample_corpus_path()
    try:
        examples, _ = read_examples(source, on_error="skip")
    except (DataError, OSError) as e:
        raise LoadTestError(f"cannot read load-test inputs from {source}: {e}") from None
    texts = [e.text for e in examples if e.text and e.text.strip()][:limit]
    if not texts:
        raise LoadTestError(f"{source} holds no usable message text")
    return texts


# -------------------------------------------------------------------------------- SLOs
_SLO_KEYS = {"p50", "p90", "p95", "p99", "max", "mean", "ttft_p50", "ttft_p99", "errors", "rps"}
_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s|m)?\s*$")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class SLO:
    """One objective: ``key`` ("p99", "errors", "rps", ...) compared with ``limit``.

    Latencies are in seconds and must stay <= limit; ``errors`` is a fraction in [0, 1]
    that must stay <= limit; ``rps`` is a throughput that must reach >= limit.
    """

    key: str
    limit: float
    text: str

    @property
    def higher_is_better(self) -> bool:
        return self.key == "rps"


def parse_slo(spec: str) -> list[SLO]:
    """Parse ``"p99=200ms,errors=0.1%,rps=50"`` (latency units us/ms/s/m; errors as % or fraction)."""
    allowed = ", ".join(sorted(_SLO_KEYS))
    out: list[SLO] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise LoadTestError(f"SLO {part!r} must look like KEY=VALUE (e.g. p99=200ms); keys: {allowed}")
        key, raw = (s.strip() for s in part.split("=", 1))
        key = key.lower()
        if key not in _SLO_KEYS:
            raise LoadTestError(f"unknown SLO key {key!r} in {part!r}; allowed: {allowed}")
        try:
            if key == "errors":
                limit = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
                if not 0 <= limit <= 1:
                    raise ValueError
            elif key == "rps":
                limit = float(raw)
                if limit < 0:
                    raise ValueError
            else:
                m = _DURATION_RE.match(raw)
                if m is None:
                    raise ValueError
                limit = float(m.group(1)) * _UNIT_SECONDS[m.group(2) or "s"]
        except ValueError:
            hint = {"errors": "a percentage (0.1%) or a fraction in [0, 1]", "rps": "requests per second >= 0"}
            raise LoadTestError(
                f"bad SLO value {raw!r} for {key}; allowed: {hint.get(key, 'a duration such as 200ms, 1.5s, 500us')}"
            ) from None
        out.append(SLO(key, limit, part))
    if not out:
        raise LoadTestError(f"empty SLO spec {spec!r}; e.g. p99=200ms,errors=0.1%")
    return out


@dataclass
class SLOResult:
    slo: str
    key: str
    limit: float
    actual: float | None
    passed: bool


def check_slos_apply(slos: Sequence[SLO], rpc: str) -> None:
    """Refuse, before a test runs, an SLO its RPC cannot measure: time to first token exists for ``reply`` only
    (checked after the run, it could only MISS with no value)."""
    for slo in slos:
        if slo.key.startswith("ttft_") and rpc != "reply":
            raise LoadTestError(f"--slo {slo.text}: time to first token is measured for --rpc reply only, not "
                                f"--rpc {rpc}; drop it or gate on latency (p50, p99, ...)")


def check_slos(report: LoadReport, slos: Sequence[SLO]) -> list[SLOResult]:
    """Compare a report with each SLO; a latency SLO with no successful request fails."""
    results = []
    for slo in slos:
        actual = report.slo_value(slo.key)
        if actual is None:
            passed = False
        elif slo.higher_is_better:
            passed = actual >= slo.limit
        else:
            passed = actual <= slo.limit
        results.append(SLOResult(slo.text, slo.key, slo.limit, actual, passed))
    return results


# ------------------------------------------------------------------------------- stats
def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (need not be sorted); None when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} is out of range; allowed: 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_stats(values: Sequence[float]) -> dict[str, float | None]:
    """count/mean/min/max and p50/p90/p95/p99 of ``values`` (same unit in as out)."""
    if not values:
        return {"count": 0, "mean": None, "min": None, "max": None, **{f"p{q}": None for q in PERCENTILES}}
    ordered = sorted(values)
    stats: dict[str, float | None] = {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "min": ordered[0],
        "max": ordered[-1],
    }
    for q in PERCENTILES:
        stats[f"p{q}"] = percentile(ordered, q)
    return stats


def histogram(values: Sequence[float], buckets: int = HISTOGRAM_BUCKETS) -> list[dict[str, float]]:
    """ghz's histogram: ``buckets`` equal-width bins from min to max; each bin's upper edge and count."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = (hi - lo) / buckets
    if width == 0:
        return [{"upper": hi, "count": len(values), "fraction": 1.0}]
    counts = [0] * buckets
    for v in values:
        counts[min(int((v - lo) / width), buckets - 1)] += 1
    n = len(values)
    return [{"upper": lo + width * (i + 1), "count": c, "fraction": c / n} for i, c in enumerate(counts)]


# ------------------------------------------------------------------------------ result
@dataclass
class CallResult:
    """One request: when it started (s since the run began), how long it took, how it ended."""

    index: int
    channel: int
    start: float
    latency: float
    status: str
    ttft: float | None = None
    tokens: int = 0  # tokens the model generated, as the server counted them (0 for a whole scripted/retrieval reply)
    error: str = ""
    path: str = ""  # reply policy: which path answered (the final chunk's; "" when the server does not say)


@dataclass
class LoadReport:
    """Everything one run measured; latencies in seconds. ``to_dict()`` is the JSON report."""

    target: str
    rpc: str
    concurrency: int
    connections: int
    rps_limit: float | None
    wall_seconds: float
    results: list[CallResult]
    server: dict[str, Any] = field(default_factory=dict)
    protocol: str = "grpc"
    # the load generator's machine (CPU model and flags, CPUs available) and its load before and after the run:
    # client and server often share the cores, so the figures mean little without it
    client: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.results)

    @property
    def ok(self) -> int:
        return sum(1 for r in self.results if r.status == "OK")

    @property
    def errors(self) -> int:
        return self.count - self.ok

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    @property
    def throughput(self) -> float:
        """Finished requests per second (all statuses, like ghz's "Requests/sec")."""
        return self.count / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def status_counts(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.results).most_common())

    def error_messages(self, top: int = 10) -> dict[str, int]:
        return dict(Counter(f"{r.status}: {r.error}" for r in self.results if r.status != "OK").most_common(top))

    def latencies(self, ok_only: bool = True) -> list[float]:
        return [r.latency for r in self.results if r.status == "OK" or not ok_only]

    def latency(self) -> dict[str, float | None]:
        """Stats over successful requests: failures (often instant) would flatter the percentiles."""
        return latency_stats(self.latencies())

    def ttft(self) -> dict[str, float | None]:
        return latency_stats([r.ttft for r in self.results if r.status == "OK" and r.ttft is not None])

    def tokens(self) -> dict[str, Any]:
        """Generated tokens: total, aggregate tokens/s over the run, and the mean per-stream decode rate.

        A token is one the model generated, as the server counts it (``ReplyFinal.completion_tokens``, the HTTP
        ``usage``), not a chunk of the stream: a scripted, retrieval or fallback reply arrives as one chunk and
        generates none. Counting chunks made a run of retrieval replies report one "token" per reply and a
        tokens/s equal to its request rate. ``replies_by_path`` says how many replies each path answered."""
        ok = [r for r in self.results if r.status == "OK"]
        total = sum(r.tokens for r in ok)
        generated = [r for r in ok if r.tokens > 0]
        # Decode rate excludes the first token (that is TTFT's job); streams of one token have none.
        rates = [(r.tokens - 1) / (r.latency - r.ttft) for r in generated
                 if r.ttft is not None and r.tokens > 1 and r.latency > r.ttft]
        return {
            "counted": TOKENS_COUNTED,
            "total": total,
            "per_request_mean": total / len(ok) if ok else 0.0,
            "per_second": total / self.wall_seconds if self.wall_seconds > 0 else 0.0,
            "stream_decode_rate_mean": sum(rates) / len(rates) if rates else None,
            "replies_generated": len(generated),
            "replies_by_path": dict(Counter(r.path or "unknown" for r in ok).most_common()),
        }

    def slo_value(self, key: str) -> float | None:
        if key == "errors":
            return self.error_rate if self.count else None
        if key == "rps":
            return self.throughput
        if key.startswith("ttft_"):
            return self.ttft()[key[len("ttft_"):]]
        return self.latency()[key]

    def to_dict(self) -> dict[str, Any]:
        lat = self.latency()
        return {
            "target": self.target,
            "protocol": self.protocol,
            "rpc": self.rpc,
            "concurrency": self.concurrency,
            "connections": self.connections,
            "rps_limit": self.rps_limit,
            "count": self.count,
            "ok": self.ok,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "wall_seconds": self.wall_seconds,
            "throughput_rps": self.throughput,
            "latency_s": lat,
            "ttft_s": self.ttft() if self.rpc == "reply" else None,
            "tokens": self.tokens() if self.rpc == "reply" else None,
            "status_codes": self.status_counts(),
            "error_messages": self.error_messages(),
            "histogram_s": histogram(self.latencies()),
            "server": self.server,
            "client": self.client,
        }


# ------------------------------------------------------------------------------ runner
class _Tickets:
    """Hands out request indices until the request count or the deadline is reached.

    With ``rps``, ticket ``i`` is released at ``t0 + i / rps`` (the caller sleeps until
    then), so the offered load stays fixed even when responses slow down.
    """

    def __init__(self, t0: float, requests: int | None, duration: float | None, rps: float | None,
                 stop: threading.Event) -> None:
        self.t0, self.requests, self.rps, self.stop = t0, requests, rps, stop
        self.deadline = t0 + duration if duration is not None else None
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> tuple[int, float] | None:
        """(index, time to start at) or None when the run is over."""
        with self._lock:
            if self.stop.is_set() or (self.requests is not None and self._next >= self.requests):
                return None
            i = self._next
            at = self.t0 + i / self.rps if self.rps else time.perf_counter()
            if self.deadline is not None and max(at, time.perf_counter()) >= self.deadline:
                return None
            self._next += 1
            return i, at


def _make_clients(cfg: LoadTestConfig) -> list[Any]:
    # Every call says it is a load test's (x-chatforge-traffic: loadtest): the server answers and stores it as any
    # other, flagged, and `conversations export` leaves it out, so a test against production does not feed its
    # synthetic messages into the next training round.
    mark = (TRAFFIC_METADATA_KEY, LOADTEST_TRAFFIC)
    if cfg.protocol == "http":
        # One pooled HTTP client per "connection"; each concurrent stream holds its own
        # HTTP/1.1 connection from the pool (SSE streams do not multiplex).
        return [HttpChatClient(cfg.target, timeout=cfg.timeout, api_key=cfg.api_key, headers=dict([mark]))
                for _ in range(cfg.connections)]
    options = [] if cfg.retries else [("grpc.enable_retries", 0)]
    creds = dict(api_key=cfg.api_key, tls=cfg.tls, ca_file=cfg.ca_file, cert_file=cfg.cert_file,
                 key_file=cfg.key_file)
    return [ChatbotClient(cfg.target, timeout=cfg.timeout, options=options, metadata=[mark], **creds)
            for _ in range(cfg.connections)]


def _reply_path(final: Any, tokens: int) -> str:
    """Which path answered a reply: the final chunk's ``path`` (set under a reply policy and for a selection model),
    else "fallback" for a pipeline's out-of-scope answer, else "generation" (over gRPC every whole reply names its
    path; an HTTP stream says nothing, so there it is "generation" when tokens were generated, else "")."""
    path = getattr(final, "path", None)
    if path:
        return path
    if getattr(final, "finish_reason", None) == "fallback":
        return "fallback"
    return "generation" if path is not None or tokens > 0 else ""


def _call(client: Any, cfg: LoadTestConfig, text: str) -> tuple[str, float | None, int, str, str]:
    """Run one request; (status, ttft seconds since start or None, generated tokens, error text, reply path)."""
    start = time.perf_counter()
    try:
        if cfg.rpc == "reply":
            ttft, chunks, final = None, 0, None
            opts = {"max_new_tokens": cfg.max_new_tokens} if cfg.max_new_tokens else {}
            for chunk in client.reply_stream(text, model=cfg.model, **opts):
                if chunk.is_final:
                    final = chunk
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - start
                chunks += 1
            # The server's count of generated tokens, not the chunks: a whole reply (scripted, retrieval) is one
            # chunk and no token. Chunks only where the server gave no count (an HTTP stream without usage).
            counted = getattr(final, "completion_tokens", None)
            tokens = counted if counted is not None else chunks
            return "OK", ttft, tokens, "", _reply_path(final, tokens)
        if cfg.rpc == "classify":
            client.classify(text, cfg.model)
            return "OK", None, 0, "", ""
        status = client.health("")
        # A reachable server that says NOT_SERVING failed the check as far as a balancer is concerned.
        return ("OK", None, 0, "", "") if status == "SERVING" else (status, None, 0, f"health {status}", "")
    except ChatbotError as e:
        return e.code.name, None, 0, (e.details or "")[:200], ""
    except Exception as e:  # noqa: BLE001 - a client-side bug must count as a failure, not kill the run
        if isinstance(e, HttpChatError):
            return e.status_name, None, 0, e.message[:200], ""
        logger.exception("load-test call raised")
        return "CLIENT_ERROR", None, 0, f"{type(e).__name__}: {e}"[:200], ""


def run_load_test(
    cfg: LoadTestConfig,
    *,
    clients: Sequence[Any] | None = None,
    stop: threading.Event | None = None,
) -> LoadReport:
    """Run one load test and return its report. Returns by itself (request count or duration).

    ``clients`` replaces the ChatbotClient channels (tests); ``stop`` ends the run early
    (e.g. Ctrl-C in the CLI): requests in flight finish, no new ones start.
    """
    cfg.validate()
    from chatforge.runtime import cpu_info  # reads torch's settings only where torch is already loaded

    client_before = cpu_info()
    own = clients is None
    channels = list(clients) if clients is not None else _make_clients(cfg)
    stop = stop or threading.Event()
    monitor = _ServerSampler(cfg.metrics_url) if cfg.metrics_url else None
    try:
        for c in channels:
            if hasattr(c, "wait_for_ready"):
                c.wait_for_ready(timeout=min(cfg.timeout, 10.0))
        if monitor is not None:
            monitor.start()
        results: list[CallResult] = []
        lock = threading.Lock()
        t0 = time.perf_counter()
        tickets = _Tickets(t0, cfg.requests, cfg.duration, cfg.rps, stop)
        texts = cfg.texts or [""]

        def worker(w: int) -> None:
            channel = w % len(channels)
            client = channels[channel]
            local: list[CallResult] = []
            while (ticket := tickets.take()) is not None:
                i, at = ticket
                delay = at - time.perf_counter()
                if delay > 0 and stop.wait(delay):
                    break
                start = time.perf_counter()
                status, ttft, tokens, error, path = _call(client, cfg, texts[i % len(texts)])
                local.append(CallResult(i, channel, start - t0, time.perf_counter() - start, status, ttft,
                                        tokens, error, path))
            with lock:
                results.extend(local)

        threads = [threading.Thread(target=worker, args=(w,), name=f"loadtest-{w}", daemon=True)
                   for w in range(cfg.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            # A call never outlives its deadline, so this join is bounded.
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server = monitor.stop() if monitor is not None else {}
        if own:
            for c in channels:
                c.close()
    results.sort(key=lambda r: r.index)
    client = dict(client_before)
    client["load_before"] = client.pop("load_average", None)
    client["load_after"] = cpu_info().get("load_average")
    report = LoadReport(cfg.target, cfg.rpc, cfg.concurrency, len(channels), cfg.rps, wall, results, server,
                        cfg.protocol, client)
    logger.info("load test finished", extra={"count": report.count, "errors": report.errors,
                                             "throughput_rps": round(report.throughput, 2)})
    return report


class _ServerSampler:
    """Samples the server's /metrics once a second during the run, for the report's server section."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.monitor = ResourceMonitor(url, interval=interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadtest-monitor", daemon=True)
        self.samples: list[Any] = []
        self.first: Any = None

    def start(self) -> None:
        self.first = self.monitor.sample()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.monitor.interval):
            try:
                self.samples.append(self.monitor.sample())
            except Exception as e:  # noqa: BLE001 - a failed scrape must not stop the load test
                logger.warning("metrics scrape failed: %s", e)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5.0)
        try:
            last = self.monitor.sample()
        except Exception as e:  # noqa: BLE001
            logger.warning("final metrics scrape failed: %s", e)
            last = self.samples[-1] if self.samples else self.first
        return summarize_samples(self.first, [*self.samples, last])


# ------------------------------------------------------------------------------- sweep
@dataclass
class SweepReport:
    """One :class:`LoadReport` per concurrency level, in the order run."""

    levels: list[int]
    reports: list[LoadReport]

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for level, r in zip(self.levels, self.reports, strict=True):
            lat, tok = r.latency(), r.tokens()
            ttft = r.ttft()
            rows.append({
                "concurrency": level, "count": r.count, "ok": r.ok, "errors": r.errors,
                "error_rate": r.error_rate, "throughput_rps": r.throughput,
                **{f"latency_{k}_ms": _ms(lat[k]) for k in ("mean", "p50", "p90", "p95", "p99", "max")},
                "ttft_p50_ms": _ms(ttft["p50"]), "ttft_p99_ms": _ms(ttft["p99"]),
                "tokens_per_second": tok["per_second"] if r.rpc == "reply" else None,
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"levels": self.levels, "rows": self.rows(), "reports": [r.to_dict() for r in self.reports]}


def parse_levels(spec: str) -> list[int]:
    """``"1,2,4,8"`` -> [1, 2, 4, 8]; each level an integer >= 1."""
    try:
        levels = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise LoadTestError(f"--sweep {spec!r} must be comma-separated integers, e.g. 1,2,4,8") from None
    if not levels or any(n < 1 for n in levels):
        raise LoadTestError(f"--sweep {spec!r} must list concurrency levels >= 1, e.g. 1,2,4,8")
    return levels


def run_sweep(cfg: LoadTestConfig, levels: Iterable[int], *, stop: threading.Event | None = None,
              on_level: Callable[[int, LoadReport], None] | None = None) -> SweepReport:
    """Run ``cfg`` once per concurrency level (each with the same requests/duration bound)."""
    levels = list(levels)
    reports = []
    for n in levels:
        run_cfg = LoadTestConfig(**{**asdict(cfg), "concurrency": n})
        report = run_load_test(run_cfg, stop=stop)
        reports.append(report)
        if on_level is not None:
            on_level(n, report)
        if stop is not None and stop.is_set():
            levels = levels[: len(reports)]
            break
    return SweepReport(levels, reports)


# ------------------------------------------------------------------------------ output
def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    kwargs = {"newline": ""} if "b" not in mode else {}
    with atomic_writer(path, mode, **kwargs) as f:
        write(f)


def _write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n"))


def _write_csv(path: Path, rows: list[dict[str, Any]], fieldnames: list[str]) -> None:
    def write(f: Any) -> None:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)

    _atomic_write(path, write)


def _save_figure(fig: Any, path: Path) -> None:
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80), mode="wb")


def write_report(report: LoadReport, out_dir: str | os.PathLike[str], *, slos: Sequence[SLOResult] = (),
                 plot: bool = True) -> dict[str, Path]:
    """Write ``report.json`` (summary), ``requests.csv`` (one row per request) and ``report.png``."""
    out = Path(out_dir)
    data = report.to_dict()
    data["slos"] = [asdict(s) for s in slos]
    paths = {"json": out / "report.json", "csv": out / "requests.csv"}
    _write_json(paths["json"], data)
    rows = [{"index": r.index, "channel": r.channel, "start_s": round(r.start, 6),
             "latency_ms": round(r.latency * 1000, 3),
             "ttft_ms": None if r.ttft is None else round(r.ttft * 1000, 3),
             "tokens": r.tokens, "path": r.path, "status": r.status, "error": r.error} for r in report.results]
    _write_csv(paths["csv"], rows, ["index", "channel", "start_s", "latency_ms", "ttft_ms", "tokens", "path", "status",
                                    "error"])
    if plot:
        paths["png"] = out / "report.png"
        _plot_report(report, paths["png"])
    return paths


def write_sweep(sweep: SweepReport, out_dir: str | os.PathLike[str], *, plot: bool = True) -> dict[str, Path]:
    """Write ``sweep.json``, ``sweep.csv`` (one row per level) and ``sweep.png``."""
    out = Path(out_dir)
    paths = {"json": out / "sweep.json", "csv": out / "sweep.csv"}
    _write_json(paths["json"], sweep.to_dict())
    rows = sweep.rows()
    _write_csv(paths["csv"], rows, list(rows[0]) if rows else ["concurrency"])
    if plot:
        paths["png"] = out / "sweep.png"
        _plot_sweep(sweep, paths["png"])
    return paths


def _pyplot() -> Any:
    # train extra only: a load generator installs chatforge[serve], which has no matplotlib
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _plot_report(report: LoadReport, path: Path) -> None:
    plt = _pyplot()
    fig, (ax_hist, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    ok = [r for r in report.results if r.status == "OK"]
    bad = [r for r in report.results if r.status != "OK"]
    lat_ms = [r.latency * 1000 for r in ok]
    if lat_ms:
        ax_hist.hist(lat_ms, bins=min(50, max(10, len(lat_ms) // 10)), color="tab:blue")
        for q, style in ((50, "--"), (99, ":")):
            v = percentile(lat_ms, q)
            ax_hist.axvline(v, color="k", linestyle=style, label=f"p{q} {v:.1f} ms")
        ax_hist.legend()
    ax_hist.set(title="latency histogram (OK requests)", xlabel="latency (ms)", ylabel="requests")
    ax_time.scatter([r.start for r in ok], lat_ms, s=4, alpha=0.5, label="OK")
    if bad:
        ax_time.scatter([r.start for r in bad], [r.latency * 1000 for r in bad], s=8, color="tab:red",
                        marker="x", label="error")
    ttft = [(r.start, r.ttft * 1000) for r in ok if r.ttft is not None]
    if ttft:
        ax_time.scatter(*zip(*ttft, strict=True), s=4, alpha=0.5, color="tab:green", label="TTFT")
    ax_time.legend(loc="upper right")
    ax_time.set(title="latency over time", xlabel="request start (s)", ylabel="ms")
    title = (f"{report.rpc} @ {report.target}: concurrency {report.concurrency}, "
             f"{report.throughput:.1f} req/s, {report.errors} errors")
    if report.client:
        c = report.client
        title += (f"\nclient: {c.get('model_name')}, {c.get('available_cpus')} CPUs available; load "
                  f"{c.get('load_before')} -> {c.get('load_after')}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _plot_sweep(sweep: SweepReport, path: Path) -> None:
    plt = _pyplot()
    rows = sweep.rows()
    x = [r["concurrency"] for r in rows]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    ax_t.plot(x, [r["throughput_rps"] for r in rows], marker="o")
    ax_t.set(title="throughput vs concurrency", xlabel="concurrency", ylabel="requests/s")
    for key in ("latency_p50_ms", "latency_p99_ms", "ttft_p99_ms"):
        ys = [r[key] for r in rows]
        if any(y is not None for y in ys):
            ax_l.plot(x, [math.nan if y is None else y for y in ys], marker="o", label=key.replace("_ms", ""))
    ax_l.legend()
    ax_l.set(title="latency vs concurrency", xlabel="concurrency", ylabel="ms")
    for ax in (ax_t, ax_l):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
