"""Prometheus metrics for the serving path and a small HTTP mirror (/metrics, /healthz, /readyz).

The latency metrics follow what LLM servers (vLLM, TGI) export, because those are what
users feel: time to first token, inter-token latency, end-to-end duration and time spent
queued, plus queue depth (``requests_waiting``) and batch sizes for capacity planning.

Every :class:`ServingMetrics` owns its own ``CollectorRegistry``: tests, and several
servers in one process, never clash on prometheus-client's global registry.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from chatforge.inference import ModelInfo

log = logging.getLogger(__name__)

# short_deadline: a DEADLINE_EXCEEDED whose caller allowed less than the latency budget (alert_rules.is_server_fault)
FAILURE_REASONS = ("validation", "overloaded", "cancelled", "deadline", "short_deadline", "internal")

# Latency buckets in seconds: a token every few ms on GPU up to tens of seconds on CPU.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _ProcessCollector(Collector):
    """CPU seconds, RSS, open fds and threads via psutil (portable, unlike /proc parsing)."""

    def __init__(self, namespace: str) -> None:
        self._proc = psutil.Process(os.getpid())
        self._prefix = f"{namespace}_process" if namespace else "process"

    def collect(self) -> Iterator[Any]:
        p = self._prefix
        with self._proc.oneshot():
            cpu = self._proc.cpu_times()
            yield CounterMetricFamily(f"{p}_cpu_seconds", "User and system CPU time.", value=cpu.user + cpu.system)
            yield GaugeMetricFamily(f"{p}_resident_memory_bytes", "Resident set size.", value=self._proc.memory_info().rss)
            yield GaugeMetricFamily(f"{p}_threads", "OS threads.", value=self._proc.num_threads())
            if hasattr(self._proc, "num_fds"):  # POSIX only
                yield GaugeMetricFamily(f"{p}_open_fds", "Open file descriptors.", value=self._proc.num_fds())


class _GpuCollector(Collector):
    """CUDA memory per device, only when torch is already loaded and CUDA is available.

    Checking ``sys.modules`` instead of importing keeps a scrape from paying torch's
    import time in processes (load testers, the metrics-only tests) that never use it.
    """

    def __init__(self, namespace: str) -> None:
        self._prefix = f"{namespace}_gpu" if namespace else "gpu"

    def collect(self) -> Iterator[Any]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily(
            f"{self._prefix}_memory_allocated_bytes", "Memory held by tensors.", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            f"{self._prefix}_memory_reserved_bytes", "Memory held by the caching allocator.", labels=["device"]
        )
        for i in range(torch.cuda.device_count()):
            allocated.add_metric([str(i)], torch.cuda.memory_allocated(i))
            reserved.add_metric([str(i)], torch.cuda.memory_reserved(i))
        yield allocated
        yield reserved


class _StoreCollector(Collector):
    """The conversation store's state, read at scrape time: whether its database answers, turns waiting to be
    written (they pile up during an outage), and turns written, given up on and dropped (queue full)."""

    def __init__(self, namespace: str, store: Any) -> None:
        self._prefix, self._store = (f"{namespace}_store" if namespace else "store"), store

    def collect(self) -> Iterator[Any]:
        p, s = self._prefix, self._store
        yield GaugeMetricFamily(f"{p}_available", "1 while the conversation database answers, 0 during an outage.",
                                value=1.0 if s.available else 0.0)
        yield GaugeMetricFamily(f"{p}_pending_turns", "Turns accepted and not yet written.", value=s.pending)
        turns = CounterMetricFamily(f"{p}_turns", "Turns by outcome: written, failed (the database refused them "
                                    "or stayed unreachable until shutdown), dropped (the queue was full).",
                                    labels=["outcome"])
        for outcome in ("written", "failed", "dropped"):
            turns.add_metric([outcome], getattr(s, outcome))
        yield turns


class _LogCollector(Collector):
    """The log writer's state (a :class:`chatforge.serving.observability.BackgroundLogHandler`), read at scrape time:
    records waiting to be written (they pile up while the sink, stderr or the log file, takes none) and records
    dropped because the queue was full."""

    def __init__(self, namespace: str, handler: Any) -> None:
        self._prefix, self._handler = (f"{namespace}_log" if namespace else "log"), handler

    def collect(self) -> Iterator[Any]:
        p, h = self._prefix, self._handler
        yield GaugeMetricFamily(f"{p}_pending_records", "Log records accepted and not yet written.", value=h.pending)
        yield CounterMetricFamily(f"{p}_dropped_records", "Log records dropped: the log sink took none while "
                                  f"{h.capacity} were waiting.", value=h.dropped)


class ServingMetrics:
    """The server's metrics and the hooks that feed them.

    A request's life, and the hook for each step (``rpc`` is the method name, e.g.
    ``"Chat"``; ``model`` the served model's name):

    1. ``request_queued(model)`` when the engine enqueues it, ``request_dequeued(model,
       queue_seconds)`` when a worker picks it up;
    2. ``request_started(rpc, model)`` when it starts running (pair it with exactly one
       ``request_finished``, otherwise ``requests_running`` drifts);
    3. ``first_token(rpc, model, seconds)`` then ``token(model, interval)`` per further
       token; ``prompt_tokens(model, n)`` once; ``batch(model, size)`` per engine batch;
    4. ``request_finished(rpc, model, status, seconds, reason=None)``; ``status`` is the
       gRPC code name (``"OK"``, ``"INVALID_ARGUMENT"``…) and ``reason`` one of
       :data:`FAILURE_REASONS` for failures.

    All hooks are cheap (a lock and a few additions) and safe from any thread.
    """

    def __init__(self, namespace: str = "chatforge", *, registry: CollectorRegistry | None = None,
                 process_metrics: bool = True) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        ns, r = namespace, self.registry
        self.requests = Counter("requests", "Finished requests.", ["rpc", "model", "status"], namespace=ns, registry=r)
        self.failures = Counter("request_failure", "Failed requests by reason.", ["rpc", "model", "reason"],
                                namespace=ns, registry=r)
        self.ttft = Histogram("time_to_first_token_seconds", "Time from request start to first token.",
                              ["rpc", "model"], buckets=_TTFT_BUCKETS, namespace=ns, registry=r)
        self.itl = Histogram("inter_token_latency_seconds", "Time between consecutive generated tokens.",
                             ["model"], buckets=_ITL_BUCKETS, namespace=ns, registry=r)
        self.duration = Histogram("request_duration_seconds", "End-to-end request duration.",
                                  ["rpc", "model"], buckets=_DURATION_BUCKETS, namespace=ns, registry=r)
        self.queue_time = Histogram("queue_time_seconds", "Time spent waiting in the engine queue.",
                                    ["model"], buckets=_TTFT_BUCKETS, namespace=ns, registry=r)
        self.waiting = Gauge("requests_waiting", "Requests queued, not yet running.", ["model"],
                             namespace=ns, registry=r)
        self.running = Gauge("requests_running", "Requests being processed.", ["model"], namespace=ns, registry=r)
        self.batch_size = Histogram("batch_size", "Requests per engine batch.", ["model"],
                                    buckets=_BATCH_BUCKETS, namespace=ns, registry=r)
        self.prompt_tokens_total = Counter("prompt_tokens", "Input tokens processed.", ["model"],
                                           namespace=ns, registry=r)
        self.generation_tokens_total = Counter("generation_tokens", "Tokens generated.", ["model"],
                                               namespace=ns, registry=r)
        self.draft_tokens_total = Counter("draft_tokens", "Speculative decoding: draft tokens the model verified, "
                                          "by outcome (accepted: the model's own greedy choice; rejected).",
                                          ["model", "outcome"], namespace=ns, registry=r)
        self.reply_paths = Counter("reply_paths", "Replies by the path that answered (reply policy: scripted, "
                                   "retrieval, generation, fallback; without one generation, or fallback for the "
                                   "pipeline's out-of-scope reply), the model that answered and whether the message "
                                   "was judged out of scope (classifier or familiarity guard).",
                                   ["path", "model", "out_of_scope"], namespace=ns, registry=r)
        self.unhandled = Counter("requests_unhandled", "Calls grpc ended before their handler ran (no status of "
                                 "ours, not in requests_total): a request message over the size limit (the client "
                                 "got RESOURCE_EXHAUSTED), or a client that left before sending its request.",
                                 ["rpc"], namespace=ns, registry=r)
        self.model_info = Gauge("model_info", "Served models (value 1); labels describe the model.",
                                ["model", "family", "task", "version"], namespace=ns, registry=r)
        if process_metrics:
            r.register(_ProcessCollector(ns))
            r.register(_GpuCollector(ns))
        # labels() builds a key and takes the metric's lock on every call; the per-token and
        # per-step hooks look their children up here instead (children are never removed).
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._namespace, self._store_watched, self._logs_watched = ns, False, False

    def watch_store(self, store: Any) -> None:
        """Export ``store``'s state (a :class:`chatforge.serving.store.ConversationStore`) as
        ``<namespace>_store_*``; once per registry."""
        if not self._store_watched:
            self.registry.register(_StoreCollector(self._namespace, store))
            self._store_watched = True

    def watch_logs(self, handler: Any) -> None:
        """Export ``handler``'s state (a :class:`chatforge.serving.observability.BackgroundLogHandler`) as
        ``<namespace>_log_*``; once per registry."""
        if not self._logs_watched:
            self.registry.register(_LogCollector(self._namespace, handler))
            self._logs_watched = True

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, metric.labels(*labels))
        return child

    # -- hooks ---------------------------------------------------------------------------
    def request_queued(self, model: str) -> None:
        self._child(self.waiting, model).inc()

    def request_dequeued(self, model: str, queue_seconds: float) -> None:
        self._child(self.waiting, model).dec()
        self._child(self.queue_time, model).observe(queue_seconds)

    def request_started(self, rpc: str, model: str) -> None:
        self._child(self.running, model).inc()

    def first_token(self, rpc: str, model: str, seconds: float) -> None:
        """The first token of a streamed reply; also counts it as a generated token."""
        self._child(self.ttft, rpc, model).observe(seconds)
        self._child(self.generation_tokens_total, model).inc()

    def token(self, model: str, interval_seconds: float | None = None) -> None:
        """A further generated token, ``interval_seconds`` after the previous one."""
        self._child(self.generation_tokens_total, model).inc()
        if interval_seconds is not None:
            self._child(self.itl, model).observe(interval_seconds)

    def prompt_tokens(self, model: str, n: int) -> None:
        self._child(self.prompt_tokens_total, model).inc(n)

    def draft_tokens(self, model: str, drafted: int, accepted: int) -> None:
        self._child(self.draft_tokens_total, model, "accepted").inc(accepted)
        self._child(self.draft_tokens_total, model, "rejected").inc(drafted - accepted)

    def batch(self, model: str, size: int) -> None:
        self._child(self.batch_size, model).observe(size)

    def reply_answered(self, path: str, model: str, out_of_scope: bool) -> None:
        """A reply's last item (the engine's ReplyDone) reached the surface: who answered it, and how."""
        self._child(self.reply_paths, path, model, "true" if out_of_scope else "false").inc()

    def request_finished(self, rpc: str, model: str, status: str, seconds: float, reason: str | None = None) -> None:
        """End of a request started with :meth:`request_started`.

        Raises ``ValueError`` for a ``reason`` outside :data:`FAILURE_REASONS` (an unbounded
        label set would blow up Prometheus' memory).
        """
        if reason is not None and reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; allowed: {', '.join(FAILURE_REASONS)}")
        self._child(self.running, model).dec()
        self._child(self.requests, rpc, model, status).inc()
        self._child(self.duration, rpc, model).observe(seconds)
        if reason is not None:
            self.failures.labels(rpc, model, reason).inc()

    def request_unhandled(self, rpc: str) -> None:
        """A call of ``rpc`` (a method this server has) that grpc ended before its handler ran."""
        self._child(self.unhandled, rpc).inc()

    def set_model_info(self, info: ModelInfo) -> None:
        """Publish a served model (call on load); :meth:`remove_model_info` on unload."""
        self.model_info.labels(info.name, info.family, info.task, info.version).set(1)

    def remove_model_info(self, info: ModelInfo) -> None:
        try:
            self.model_info.remove(info.name, info.family, info.task, info.version)
        except KeyError:
            pass

    # -- exposition ----------------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A sample's current value (handy for tests and health checks)."""
        return self.registry.get_sample_value(name, labels or {})


# Seconds a connection may take to send its whole request head (request line and headers), from the moment it
# is accepted: the server runs a thread per connection, so a client that opens one and never finishes its request
# line (slowloris) held a thread for good, and one that sends a header line every few seconds held it as long as it
# liked while a timeout applied to each read only. One request per connection (HTTP/1.0 answers, then a close), so
# this bounds the whole time a connection spends being read. Also the timeout of each write of the answer.
REQUEST_READ_TIMEOUT_S = 10.0
# The paths the reserved probe slots serve (see RESERVED_PROBE_CONNECTIONS).
_PROBE_PATHS = ("/healthz", "/readyz")


class _HeadDeadlineReader(io.RawIOBase):
    """The connection's bytes, all of them before one deadline: each read waits at most for what is left of it,
    so a request head trickled a line at a time ends at the deadline (``TimeoutError``, which http.server answers
    by closing the connection) instead of lasting as long as the client keeps sending."""

    def __init__(self, sock: socket.socket, seconds: float, write_timeout: float) -> None:
        super().__init__()
        self._sock, self._deadline, self._write_timeout = sock, time.monotonic() + seconds, write_timeout
        self._seconds, self.timed_out = seconds, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            self.timed_out = True
            raise TimeoutError(f"request head not received within {self._seconds:g} s")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            self.timed_out = True
            raise
        finally:
            self._sock.settimeout(self._write_timeout)  # the answer's writes get the ordinary timeout


class _Handler(BaseHTTPRequestHandler):
    server: _MirrorHTTPServer  # type: ignore[assignment]

    def setup(self) -> None:
        self.timeout = REQUEST_READ_TIMEOUT_S  # read by StreamRequestHandler.setup (socket timeout, for writes)
        super().setup()
        # A connection in a reserved probe slot serves /healthz and /readyz only, and must send its request at once.
        self._probe_only = self.server.is_probe_only(self.request)
        head_s = min(PROBE_HEAD_TIMEOUT_S, REQUEST_READ_TIMEOUT_S) if self._probe_only else REQUEST_READ_TIMEOUT_S
        self.rfile.close()  # the socket file StreamRequestHandler made (closing it leaves the socket open)
        self._reader = _HeadDeadlineReader(self.connection, head_s, REQUEST_READ_TIMEOUT_S)
        self.rfile = io.BufferedReader(self._reader)

    def handle(self) -> None:
        super().handle()  # a request head past its deadline ends here too (http.server closes the connection)
        if self._probe_only and self._reader.timed_out:
            # A connection over the cap that sent no probe in time: the answer any connection over the cap gets.
            try:
                self.wfile.write(_BUSY)
            except OSError:
                pass

    def __getattr__(self, name: str) -> Any:
        # http.server looks up do_<METHOD> and answers 501 with an HTML page when there is none: every method
        # but GET and HEAD (TRACE, CONNECT, anything made up) is refused with 405 like POST instead.
        if name.startswith("do_"):
            return self._refuse_method
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def do_HEAD(self) -> None:  # noqa: N802 - probes and `curl -I`: GET's status and headers, no body
        self._head_only = True
        try:
            self.do_GET()
        finally:
            self._head_only = False

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if self._probe_only and path not in _PROBE_PATHS:
            self.close_connection = True
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"too many connections\n",
                       extra_headers=(("Retry-After", "1"), ("Connection", "close")))
            return
        if path == "/metrics":
            try:
                body = self.server.metrics.render()
            except Exception:
                log.exception("rendering metrics failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"metrics unavailable\n")
                return
            self._send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._probe(self.server.liveness, b"ok\n", b"not live\n", "liveness")
        elif path == "/readyz":
            self._probe(self.server.readiness, b"ready\n", b"not ready\n", "readiness")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found; try /metrics, /healthz or /readyz\n")

    def _probe(self, check: Callable[[], bool], ok: bytes, not_ok: bytes, what: str) -> None:
        """200 ``ok`` when ``check()`` is true, else 503 ``not_ok``; a check that raises counts as false."""
        try:
            passed = bool(check())
        except Exception:
            log.exception("%s check raised; reporting it failed", what)
            passed = False
        self._send(HTTPStatus.OK if passed else HTTPStatus.SERVICE_UNAVAILABLE, ok if passed else not_ok)

    def _refuse_method(self) -> None:
        """Any method but GET and HEAD: 405 naming the allowed ones (http.server's own answer was a 501 HTML page).
        A body the client sent is not read; the connection closes after the answer."""
        self.close_connection = True
        # The method is any token of the request line: named back only when it looks like one.
        method = self.command if len(self.command) <= 32 and self.command.isalnum() else "this method"
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here; allowed: GET, HEAD\n".encode(),
                   extra_headers=(("Allow", "GET, HEAD"), ("Connection", "close")))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815 - http.server's naming

    def _send(self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra_headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        for name, value in extra_headers:
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not getattr(self, "_head_only", False):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        # Scrapes come every few seconds: debug, and through logging rather than stderr.
        log.debug("metrics http: " + format, *args)


# Connections served at once: scrapers and probes need a few; each holds a thread (for at most
# REQUEST_READ_TIMEOUT_S while it sends its request), so more would only be threads for an abusive client.
MAX_CONNECTIONS = 64
# Beyond MAX_CONNECTIONS, a few more connections are taken for liveness and readiness probes only: they must send
# their request within PROBE_HEAD_TIMEOUT_S (a kubelet or HAProxy sends it at once) and are answered 503 for any
# other path. Slow clients that filled the ordinary slots then no longer fail the probes (and restart the pod).
RESERVED_PROBE_CONNECTIONS = 4
PROBE_HEAD_TIMEOUT_S = 1.0
# Connections waiting to be accepted (the listen backlog). socketserver's default is 5: a burst of probes and
# scrapes beyond it had its SYNs dropped and retransmitted a second later, past a kubelet's 1 s probe timeout.
LISTEN_BACKLOG = 128
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: 21\r\n\r\ntoo many connections\n")


class _MirrorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG  # read by server_activate (listen)

    def __init__(self, addr: tuple[str, int], metrics: ServingMetrics, readiness: Callable[[], bool],
                 liveness: Callable[[], bool] = lambda: True) -> None:
        self.request_queue_size = max(LISTEN_BACKLOG, MAX_CONNECTIONS + RESERVED_PROBE_CONNECTIONS)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._probe_slots = threading.BoundedSemaphore(RESERVED_PROBE_CONNECTIONS) if RESERVED_PROBE_CONNECTIONS \
            else None
        self._held: dict[socket.socket, threading.BoundedSemaphore] = {}  # connection -> the slot it holds
        self._held_lock = threading.Lock()
        super().__init__(addr, _Handler)
        self.metrics = metrics
        self.readiness = readiness
        self.liveness = liveness

    def is_probe_only(self, request: socket.socket) -> bool:
        with self._held_lock:
            return self._probe_slots is not None and self._held.get(request) is self._probe_slots

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        """A thread per connection, at most MAX_CONNECTIONS (plus RESERVED_PROBE_CONNECTIONS for probes): one more
        is answered 503 at once and closed."""
        if self._slots.acquire(blocking=False):
            slot = self._slots
        elif self._probe_slots is not None and self._probe_slots.acquire(blocking=False):
            slot = self._probe_slots
        else:
            log.warning("metrics http: connection refused, %d open", MAX_CONNECTIONS + RESERVED_PROBE_CONNECTIONS)
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._held_lock:
            self._held[request] = slot
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: socket.socket) -> None:
        with self._held_lock:
            slot = self._held.pop(request, None)
        if slot is not None:
            slot.release()

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        # socketserver printed a traceback to stderr; a client that reset its connection is no error of ours.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.debug("metrics http: connection from %s ended: %r", client_address, exc)
        else:
            log.exception("metrics http: handling a connection from %s failed", client_address)


class MetricsHTTPServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over plain HTTP for scrapers and probes.

    Kubernetes probes and Prometheus speak HTTP, not gRPC; this mirrors the gRPC health
    service on a side port. ``/healthz`` is 200 while ``liveness()`` returns True (the process is up and
    nothing it needs has stopped; else 503);
    ``/readyz`` is 200 only when ``readiness()`` returns True (e.g. models loaded and not
    draining), else 503. Runs in a daemon thread; ``port=0`` picks a free port, read it
    back from :attr:`port` after :meth:`start`.
    """

    def __init__(self, metrics: ServingMetrics, host: str = "127.0.0.1", port: int = 0,
                 readiness: Callable[[], bool] = lambda: True, liveness: Callable[[], bool] = lambda: True) -> None:
        self.metrics, self.host, self._requested_port, self.readiness = metrics, host, port, readiness
        self.liveness = liveness
        self._server: _MirrorHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("MetricsHTTPServer is not started; call start() first")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> MetricsHTTPServer:
        if self._server is not None:
            return self
        self._server = _MirrorHTTPServer((self.host, self._requested_port), self.metrics, self.readiness,
                                         self.liveness)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="chatforge-metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics http server listening", extra={"host": self.host, "port": self.port})
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server, self._thread = None, None

    def __enter__(self) -> MetricsHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
