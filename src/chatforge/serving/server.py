"""The grpc.aio server: Chatbot + standard health checking + reflection, signals, drain.

Lifecycle (what a load balancer / Kubernetes sees). Two health services:
*liveness* ``""`` (the process is up) and *readiness* ``chatforge.v1.Chatbot`` (send me traffic).

1. bind the port and start: liveness SERVING, readiness NOT_SERVING; Chatbot calls answer
   UNAVAILABLE ("still loading");
2. load the models in a worker thread (the event loop keeps answering health checks);
3. readiness -> SERVING; the bound port is written (atomically) to ``port_file``;
4. SIGTERM/SIGINT/SIGHUP -> drain: readiness NOT_SERVING at once (gRPC health and ``/readyz``), and
   for ``drain_delay`` seconds the server still accepts and serves every call, so that a
   balancer polling readiness (HAProxy every second, a Kubernetes readiness probe, endpoints
   removal) takes the replica out before any call is refused; then new Chatbot calls answer
   UNAVAILABLE (clients retry elsewhere), in-flight calls get ``grace`` seconds to finish,
   streams still running after that end with UNAVAILABLE "server shutting down", the model
   runners' threads are joined, the conversation store is flushed, the gRPC server stops,
   liveness goes NOT_SERVING last, and ``serve`` returns (exit 0).

Why not ``HealthServicer.enter_graceful_shutdown()`` at step 4: it sets *every* service to
NOT_SERVING (and ignores later changes), so a liveness probe would see the pod as dead
while it is still finishing streams, and could restart it mid-drain. The split is explicit
here: only readiness flips at the start of the drain; ``enter_graceful_shutdown`` runs at
the very end. Likewise ``server.stop(grace)`` alone would refuse health checks at once, so
the drain refuses Chatbot calls in the interceptor (``CallGate``) while health keeps answering.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatforge.fileio import atomic_write_text
from chatforge.inference import check_precision
from chatforge.runtime import SERVING_RESERVED_CPUS, configure_threads, fd_budget
from chatforge.serving import backend_ct2, backend_ort
from chatforge.serving.alert_rules import AlertRules, RollingCallStats
from chatforge.serving.alerts import AlertManager
from chatforge.serving.engine import Engine, PipelineConfig, check_draft_tokens
from chatforge.serving.http import HttpSurface
from chatforge.serving.interceptors import CallGate, RequestContextInterceptor
from chatforge.serving.metrics import MetricsHTTPServer, ServingMetrics
from chatforge.serving.observability import configure_logging
from chatforge.serving.policy import ReplyPolicy
from chatforge.serving.repository import ModelDirectory, ModelDirectoryWatcher
from chatforge.serving.security import ApiKeyAuth, TlsConfig
from chatforge.serving.service import SERVICE_NAME, ChatbotServicer
from chatforge.serving.store import ConversationStore
from chatforge.settings import get_settings
from chatforge.v1 import chatbot_pb2_grpc

logger = logging.getLogger(__name__)

# Connection management, consistent with chatforge.client.channel (client pings every 30 s):
# - the server pings idle connections every 60 s (timeout 20 s) to drop dead peers that
#   vanished without a FIN (NAT, crashed VM), also when no call is open (permit_without_calls);
# - it accepts client pings as often as every 10 s without data, well below the client's 30 s,
#   so a well-behaved client is never answered with GOAWAY "too_many_pings";
# - max_connection_age (5 min + 1 min grace for open streams): the server closes each connection
#   politely (GOAWAY) after a while, so clients reconnect and an L4 balancer, which balances
#   connections and not calls, spreads load onto new replicas; the jitter grpc adds avoids
#   reconnect storms. Clients retry the GOAWAY'd (unstarted) calls transparently;
# - so_reuseport=0: a second server on a taken port fails to bind instead of silently sharing it;
# - server_handshake_timeout_ms: a connection must finish its handshake (TLS, the HTTP/2 preface) in
#   HANDSHAKE_TIMEOUT_MS; grpc's default (120 s) let a client that opened connections and sent nothing hold
#   each one, and a file descriptor, for two minutes. ChatbotServer sets it, with the cap on connections
#   (grpc's max_allowed_incoming_connections), which depends on the process's descriptor limit.
HANDSHAKE_TIMEOUT_MS = 10_000
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_connection_age_ms", 5 * 60_000),
    ("grpc.max_connection_age_grace_ms", 60_000),
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
)

# Streams one HTTP/2 connection may hold open at once (grpc.max_concurrent_streams, sent to the client in SETTINGS):
# grpc's default is unlimited, so one connection could open streams without end (each a call, its buffers and a
# task). The default is what one model's engine can hold (max_running + max_queued: a call beyond that is refused
# RESOURCE_EXHAUSTED by the engine anyway) plus STREAM_HEADROOM for health Watch, reflection and Classify calls
# beside. What happens beyond it (measured with grpcio 1.85, tests/serving/test_server_streams_bound.py): a grpc
# client queues the extra calls on its side until a stream ends or the call's deadline passes (HTTP/2 semantics;
# other connections are served meanwhile); a client that ignores the SETTINGS gets RST_STREAM for each extra stream
# (REFUSED_STREAM; ENHANCE_YOUR_CALM while it has not acknowledged them), and its first streams are still answered.
# Not grpc.aio.server(maximum_concurrent_rpcs=): that cap is per process and refuses every RPC beyond it, health
# checks included, so a flood of calls would fail the liveness probe and get a busy replica restarted.
STREAM_HEADROOM = 16


def default_max_concurrent_streams(max_running: int = 8, max_queued: int = 64) -> int:
    """The per-connection stream bound for an engine with these (per-model) limits: its capacity plus headroom."""
    return max_running + max_queued + STREAM_HEADROOM


# After the grace: how long streams get to send their UNAVAILABLE status once the engine stops them,
# and how long the runners' threads get to finish their current step (one decoding step).
STREAM_END_WAIT = 2.0
RUNNER_JOIN_TIMEOUT = 10.0
# How long shutdown waits for the conversation store's unwritten turns: while its database answers, and during an
# outage (then waiting is mostly futile, and a drain must end inside compose's/Kubernetes' grace period).
STORE_FLUSH_TIMEOUT = 30.0
STORE_OUTAGE_FLUSH_TIMEOUT = 2.0
# Alerts get ALERTS_FLUSH_TIMEOUT to go out during the drain, and ALERTS_CLOSE_TIMEOUT more when the process ends: a
# webhook that hangs must not hold a shutdown past its grace period (deploy/k8s: 30 s, 20 of them preStop, drain
# delay and grace).
ALERTS_FLUSH_TIMEOUT = 5.0
ALERTS_CLOSE_TIMEOUT = 2.0

LIVENESS, READINESS = "", SERVICE_NAME
# Why readiness goes NOT_SERVING on SIGTERM (every deploy and scale-down): announced (info), not paged (critical).
DRAIN_REASON = "draining: shutdown requested"
HEALTH_SERVICES = (LIVENESS, READINESS)

EngineOrLoader = Engine | Callable[[], Engine]


def _check_streams_bound(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_concurrent_streams={value!r} is out of range; allowed: an integer >= 1 (streams one "
                         "connection may hold open at once)")


def write_port_file(path: str | Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    atomic_write_text(path, f"{port}\n")


class ChatbotServer:
    """One grpc.aio server hosting the Chatbot service, health checking and reflection.

    Health semantics follow the gRPC health checking protocol
    (https://github.com/grpc/grpc/blob/master/doc/health-checking.md); see the module
    docstring for liveness vs readiness and the drain. Optional operations wiring:
    ``metrics`` (ServingMetrics; with ``metrics_port`` also served over HTTP with
    /metrics, /healthz, /readyz), ``alerts`` (AlertManager), ``store`` (ConversationStore,
    flushed on drain), ``auth`` (ApiKeyAuth), ``tls`` (TlsConfig), ``model_dir`` (a
    ModelDirectory watched every ``poll_interval`` seconds for new versions), ``http_port``
    (the OpenAI-compatible HTTP API and chat page of :mod:`chatforge.serving.http`, on this loop).
    """

    def __init__(
        self,
        engine_or_loader: EngineOrLoader,
        host: str = "127.0.0.1",
        port: int = 50051,
        *,
        grace: float = 10.0,
        drain_delay: float = 0.0,
        port_file: str | Path | None = None,
        options: Sequence[tuple[str, object]] = (),
        metrics=None,
        metrics_port: int | None = None,
        alerts=None,
        store=None,
        auth=None,
        tls=None,
        model_dir: ModelDirectory | None = None,
        poll_interval: float = 5.0,
        max_message_bytes: int | None = None,
        alert_rules=None,
        alert_rules_interval: float = 15.0,
        http_port: int | None = None,
        max_concurrent_streams: int | None = None,
    ) -> None:
        if not (0 <= port <= 65535):
            raise ValueError(f"port={port!r} is out of range; allowed: 0 (ephemeral) to 65535")
        if grace < 0:
            raise ValueError(f"grace={grace!r} is out of range; allowed: a number of seconds >= 0")
        if not drain_delay >= 0:
            raise ValueError(f"drain_delay={drain_delay!r} is out of range; allowed: a number of seconds >= 0")
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ValueError(f"metrics_port={metrics_port!r} is out of range; allowed: 0 to 65535")
        if max_message_bytes is not None and max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={max_message_bytes!r} is out of range; allowed: >= 1024")
        if max_concurrent_streams is None:
            max_concurrent_streams = default_max_concurrent_streams(
                *((engine_or_loader.max_running, engine_or_loader.max_queued)
                  if isinstance(engine_or_loader, Engine) else ()))
        _check_streams_bound(max_concurrent_streams)
        if metrics_port is not None and metrics is None:
            metrics = ServingMetrics()
        self._engine_or_loader = engine_or_loader
        self.host, self.requested_port, self.grace, self.drain_delay = host, port, grace, drain_delay
        self.port_file = Path(port_file) if port_file is not None else None
        # Later options override the defaults; deduplicated so no grpc version has to choose.
        merged = dict(SERVER_OPTIONS)
        merged["grpc.server_handshake_timeout_ms"] = HANDSHAKE_TIMEOUT_MS
        # Half the descriptors for gRPC connections (the HTTP port takes a quarter): one more is closed at
        # once, so idle connections cannot starve the rest of the process ("Too many open files").
        merged["grpc.max_allowed_incoming_connections"] = fd_budget(0.5)
        merged["grpc.max_concurrent_streams"] = max_concurrent_streams  # see STREAM_HEADROOM
        self.max_message_bytes = max_message_bytes  # also the HTTP surface's request body limit
        if max_message_bytes is not None:
            merged["grpc.max_receive_message_length"] = max_message_bytes
            merged["grpc.max_send_message_length"] = max_message_bytes
        merged.update(dict(options))
        self._options = list(merged.items())
        self.max_concurrent_streams = merged["grpc.max_concurrent_streams"]
        self.metrics, self.metrics_port, self.alerts, self.store = metrics, metrics_port, alerts, store
        if metrics is not None and store is not None:
            metrics.watch_store(store)
        self.auth, self.tls, self.model_dir, self.poll_interval = auth, tls, model_dir, poll_interval
        self.metrics_http = None
        # Error-rate / p99 rules (serving/alert_rules.py), evaluated on a timer off the request path.
        self.alert_rules, self.alert_rules_interval = alert_rules, alert_rules_interval
        self._rules_task: asyncio.Task | None = None
        self.watcher: ModelDirectoryWatcher | None = None
        self.gate = CallGate()
        self.servicer = ChatbotServicer(store=store)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.serving = asyncio.Event()
        self.ready = False  # readiness, as the HTTP mirror reports it (read from its thread)
        self.live = True  # liveness: False once a part the replica needs has stopped (the model watcher)
        self._shutdown_requested = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._load_task: asyncio.Task | None = None
        # The HTTP surface (serving/http.py): same loop, engine, gate, auth and metrics as gRPC.
        self.http = None
        if http_port is not None:
            self.http = HttpSurface(self, host, http_port)

    @property
    def engine(self) -> Engine | None:
        return self.servicer.engine

    def _watcher_stopped(self, loop: asyncio.AbstractEventLoop, reason: BaseException | None) -> None:
        """Called on the watcher's thread when it ends unasked: liveness goes NOT_SERVING (gRPC health "",
        the metrics port's and the HTTP surface's /healthz), so Kubernetes' liveness probe restarts the
        replica; it goes on serving its loaded models until then."""
        self.live = False
        if self.alerts is not None:
            self.alerts.watcher_stopped(str(self.model_dir.root) if self.model_dir else "", reason)

        def set_liveness() -> None:
            loop.create_task(self.health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING))

        try:
            loop.call_soon_threadsafe(set_liveness)
        except RuntimeError:  # the loop is gone: the server already stopped
            pass

    async def _set_readiness(self, status: int, reason: str | None = None) -> None:
        await self.health.set(READINESS, status)
        self.ready = status == health_pb2.HealthCheckResponse.SERVING
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        logger.info("readiness %s", name, extra={"service": READINESS, "status": name})
        if self.alerts is not None:
            self.alerts.health_changed(READINESS, name, reason=reason)

    async def start(self) -> int:
        """Bind, start answering (not ready), start loading the models; return the bound port."""
        interceptor = RequestContextInterceptor(metrics=self.metrics, alerts=self.alerts, auth=self.auth,
                                                gate=self.gate,
                                                call_stats=self.alert_rules.stats if self.alert_rules else None)
        server = grpc.aio.server(interceptors=[interceptor], options=self._options)
        chatbot_pb2_grpc.add_ChatbotServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        # Liveness is SERVING while the process runs (a slow model load is not a reason to
        # restart it); readiness waits for the models.
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(READINESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.host}:{self.requested_port}"
        try:
            if self.tls is not None:
                self.port = server.add_secure_port(address, self.tls.server_credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot bind {address}: {e}") from None
        if self.port == 0:  # older grpcio signals a bind failure by returning 0
            raise OSError(f"cannot bind {address}: the port is taken or the address is not local")
        await server.start()
        self._server = server
        if self.http is not None:
            try:
                await self.http.start()
            except OSError:
                await server.stop(0)
                raise
        # "auth", not "api_keys": the log redacts fields named like secrets, which hid whether keys are on at all.
        logger.info("listening", extra={"address": f"{self.host}:{self.port}", "tls": self.tls is not None,
                                        "mutual_tls": self.tls is not None and self.tls.client_ca_file is not None,
                                        "auth": "api_keys" if self.auth is not None else "none"})
        if self.metrics_port is not None:
            self.metrics_http = MetricsHTTPServer(self.metrics, self.host, self.metrics_port,
                                                  readiness=lambda: self.ready, liveness=lambda: self.live).start()
        self._load_task = asyncio.get_running_loop().create_task(self._load())
        if self.alert_rules is not None:
            self._rules_task = asyncio.get_running_loop().create_task(self._evaluate_rules())
        return self.port

    async def _evaluate_rules(self) -> None:
        while True:
            await asyncio.sleep(self.alert_rules_interval)  # a schedule, not synchronisation
            try:
                self.alert_rules.check()
            except Exception:  # a broken rule must never take the server down
                logger.exception("alert rule evaluation failed")

    def _on_engine_error(self, exc: BaseException) -> None:
        if self.alerts is not None:
            self.alerts.alert_exception(exc, rpc="engine")

    async def _load(self) -> None:
        if isinstance(self._engine_or_loader, Engine):
            engine = self._engine_or_loader
        else:
            # Loading reads files and builds torch models: never on the event loop.
            try:
                engine = await _in_daemon_thread(self._engine_or_loader)
            except BaseException as e:
                if self.alerts is not None and isinstance(e, Exception):
                    self.alerts.model_load_failed("<startup>", e)
                raise
            if not isinstance(engine, Engine):
                raise TypeError(f"the loader returned {type(engine).__name__}; expected an Engine")
        if self._shutdown_requested.is_set():
            engine.close()
            return
        engine.attach(metrics=self.metrics, on_error=self._on_engine_error if self.alerts is not None else None)
        self.servicer.engine = engine
        if self.model_dir is not None:
            on_load_error = self.alerts.model_load_failed if self.alerts is not None else None
            on_problem = self.alerts.model_directory_problem if self.alerts is not None else None
            loop = asyncio.get_running_loop()
            self.watcher = ModelDirectoryWatcher(
                engine, self.model_dir, poll_interval=self.poll_interval, on_load_error=on_load_error,
                on_problem=on_problem,
                on_stopped=lambda reason: self._watcher_stopped(loop, reason)).start()
        await self._set_readiness(health_pb2.HealthCheckResponse.SERVING)
        if self.port_file is not None:
            write_port_file(self.port_file, self.port)
        self.serving.set()
        logger.info("serving", extra={"models": [m.name for m in engine.models()], "port": self.port})

    def request_shutdown(self) -> None:
        """Ask :meth:`wait` to return (signal handlers call this; call it on the server's loop)."""
        self._shutdown_requested.set()

    async def wait_until_serving(self) -> None:
        """Return once the models are loaded (SERVING); raise the loader's error if it failed."""
        assert self._load_task is not None, "call start() first"
        serving = asyncio.ensure_future(self.serving.wait())
        await asyncio.wait({self._load_task, serving}, return_when=asyncio.FIRST_COMPLETED)
        serving.cancel()
        if self._load_task.done() and not self._load_task.cancelled() and self._load_task.exception():
            raise self._load_task.exception()

    async def wait(self) -> None:
        """Run until :meth:`request_shutdown` (or the loader fails), then shut down gracefully."""
        assert self._load_task is not None, "call start() first"
        stop_wait = asyncio.ensure_future(self._shutdown_requested.wait())
        await asyncio.wait({self._load_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        load_error = None
        if (
            not self._shutdown_requested.is_set()
            and not self._load_task.cancelled()
            and self._load_task.exception() is not None
        ):
            load_error = self._load_task.exception()
            if isinstance(load_error, (ValueError, FileNotFoundError)):
                # A configuration error (a bad pin, a policy naming a model of another task, a store that is not
                # one): its message says it all, and `chatforge serve` prints it as one line; no traceback
                logger.error("loading the models failed; shutting down: %s", load_error)
                load_error.chatforge_logged = True  # type: ignore[attr-defined]  # serve's JSON mode: not again
            else:
                logger.error("loading the models failed; shutting down", exc_info=load_error)
        else:
            await self._shutdown_requested.wait()
        stop_wait.cancel()
        # A failed load is no planned drain: its readiness alert stays critical (reason None).
        await self.shutdown(reason=None if load_error is not None else DRAIN_REASON)
        if load_error is not None:
            raise load_error

    async def shutdown(self, grace: float | None = None, *, reason: str | None = None) -> None:
        """Drain (see the module docstring): readiness off, refuse new calls, finish in-flight ones. ``reason`` (a
        drain the server was asked for) makes the readiness alert info, not critical."""
        grace = self.grace if grace is None else grace
        self._shutdown_requested.set()
        was_ready = self.ready
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING, reason=reason)
        if was_ready and self.drain_delay > 0:
            # Still accepting and serving: balancers see readiness go NOT_SERVING and stop sending
            # before anything is refused. A replica that never was ready has no traffic to move.
            logger.info("readiness off; serving on for the drain delay", extra={"drain_delay_s": self.drain_delay})
            await asyncio.sleep(self.drain_delay)  # a schedule (the balancer's poll), not synchronisation
        self.gate.draining = True
        logger.info("shutting down", extra={"grace_s": grace, "in_flight": self.gate.in_flight})
        if not await self.gate.wait_idle(grace):
            logger.warning("grace period over; ending %d unfinished calls with UNAVAILABLE", self.gate.in_flight,
                           extra={"in_flight": self.gate.in_flight})
            if self.servicer.engine is not None:
                # Each stream still running ends with a clear status (UNAVAILABLE "server shutting
                # down"), sent by its own handler, rather than a transport-level cancel.
                self.servicer.engine.close()
            if not await self.gate.wait_idle(STREAM_END_WAIT):
                logger.warning("%d calls did not end; cancelling them", self.gate.in_flight)
        if self.watcher is not None:
            self.watcher.stop()
        if self._rules_task is not None:
            self._rules_task.cancel()
        if self.http is not None:
            await self.http.stop()  # its calls were drained through the same gate
        if self._server is not None:
            # Whatever is left is cancelled now.
            await self._server.stop(0.5 if self.gate.in_flight == 0 else 0)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.servicer.engine is not None:
            self.servicer.engine.close()
            # Join the model runners' threads: a daemon thread still inside a torch kernel (with its
            # OpenMP pool) when the interpreter finalises can abort the process ("terminate called
            # without an active exception", SIGABRT) instead of exit 0.
            if not await asyncio.to_thread(self.servicer.engine.join, RUNNER_JOIN_TIMEOUT):
                logger.error("model runner threads still running after %.0f s", RUNNER_JOIN_TIMEOUT)
        if self.store is not None:
            # Every acknowledged turn reaches the database before the process exits; during an outage only
            # briefly, so that a drain stays inside its grace period (the store's close() counts what is lost).
            wait = STORE_FLUSH_TIMEOUT if getattr(self.store, "available", True) else STORE_OUTAGE_FLUSH_TIMEOUT
            if not await asyncio.to_thread(self.store.flush, wait):
                logger.error("conversation store flush timed out during shutdown")
        if self.alerts is not None:
            await asyncio.to_thread(self.alerts.flush, ALERTS_FLUSH_TIMEOUT)
        if self.metrics_http is not None:
            self.metrics_http.stop()
        await self.health.enter_graceful_shutdown()  # liveness last: the process is about to exit
        self._release_grpc()
        logger.info("stopped")

    def _release_grpc(self) -> None:
        """Free the stopped grpc.aio server now, so grpc's completion-queue poller thread is joined here.

        grpc.aio runs one native poller thread while any aio server or channel object exists; it
        ends only when the last one is deallocated. Our server can sit in reference cycles (handlers,
        tasks, callbacks) and would then live until the interpreter finalises, with a native thread
        still inside grpc core while the process tears down: the same hazard as a runner thread left
        mid-step (SIGABRT, "terminate called without an active exception", instead of exit 0).
        """
        self._server = None
        gc.collect()  # the cycles that still reference the stopped server


async def _in_daemon_thread(fn: Callable[[], Engine]) -> Engine:
    """Run ``fn`` in a daemon thread: a SIGTERM during a slow load must not wait for the load
    (asyncio.run joins the default executor and interpreter exit joins pool threads)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result=None, error=None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            outcome = (fn(), None)
        except BaseException as e:  # reported to the awaiting task
            outcome = (None, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is gone: the server already shut down
            logger.debug("model loading finished after the server stopped")

    threading.Thread(target=target, name="chatforge-load", daemon=True).start()
    return await future


async def serve(
    engine_or_loader: EngineOrLoader,
    host: str = "127.0.0.1",
    port: int = 50051,
    *,
    ready_event: asyncio.Event | threading.Event | None = None,
    handle_signals: bool = True,
    **server_kwargs,
) -> None:
    """Serve until SIGTERM/SIGINT/SIGHUP; return after a graceful shutdown.

    ``engine_or_loader`` is an :class:`Engine` or a no-argument callable that builds one
    (run in a thread after the port is bound). ``port=0`` picks a free port; the bound
    port is written to ``port_file`` once SERVING. ``ready_event`` is set at the same time.
    Signal handlers are installed only when ``handle_signals`` and on the main thread.
    ``server_kwargs`` go to :class:`ChatbotServer` (grace, drain_delay, port_file, metrics,
    alerts, store, auth, tls, ...).
    """
    server = ChatbotServer(engine_or_loader, host, port, **server_kwargs)
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    if handle_signals and threading.current_thread() is threading.main_thread():
        # SIGHUP (the terminal that started it closed; a supervisor's hang-up) drains like SIGTERM: its default
        # action killed the process at once, failing every call in flight. Nothing is reloaded on it.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, server.request_shutdown)
            installed.append(sig)
    try:
        await server.start()
        if ready_event is not None:
            loop.create_task(_set_when_serving(server, ready_event))
        await server.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _set_when_serving(server: ChatbotServer, event: asyncio.Event | threading.Event) -> None:
    await server.serving.wait()
    event.set()


def operations(settings) -> dict:
    """The operations library a served process runs with, from ``settings``: Prometheus metrics,
    webhook alerts and their rules, the conversation store (``ChatbotServer`` keyword arguments;
    the caller closes ``alerts`` and ``store``). ``run_server`` and the benchmarks share it."""
    alerts = AlertManager.from_settings(settings)
    rules = AlertRules(alerts, RollingCallStats(settings.alert_window_seconds),
                       error_rate=settings.alert_error_rate, p99_seconds=settings.alert_p99_ms / 1000.0,
                       min_calls=settings.alert_min_calls)
    return {"metrics": ServingMetrics(), "alerts": alerts, "alert_rules": rules,
            "store": ConversationStore.from_settings(settings, alerts=alerts)}


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType({str(k): str(v) for k, v in (mapping or {}).items()})


@dataclass(frozen=True)
class ServerConfig:
    """Everything a served process is started with, checked once, before the port is bound.

    Built by ``chatforge serve`` (or any caller) and handed to :func:`run_server`. Models come
    from ``bundles`` (name -> bundle folder) or ``model_dir`` (``DIR/<name>/<version>/``, see
    :mod:`chatforge.serving.repository`; ``pins`` name -> version), never both. The ``max_*``
    limits and ``pipeline`` are the engine's (:class:`chatforge.serving.engine.Engine`);
    ``drain_delay`` is how long readiness is off before a SIGTERM stops taking calls (0
    disables); ``open_health=False`` makes health and reflection need an API key too; ``http_port`` also
    serves the OpenAI-compatible HTTP surface (:mod:`chatforge.serving.http`).
    """

    bundles: Mapping[str, str] = field(default_factory=dict)
    model_dir: Path | None = None
    pins: Mapping[str, str] = field(default_factory=dict)
    poll_interval: float = 5.0
    host: str = "127.0.0.1"
    port: int = 50051
    port_file: Path | None = None
    grace: float = 10.0
    drain_delay: float = 5.0
    metrics_port: int | None = None
    http_port: int | None = None
    api_keys_file: Path | None = None
    open_health: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    max_message_bytes: int | None = None
    max_concurrent_streams: int | None = None  # per HTTP/2 connection; None: default_max_concurrent_streams
    precision: str = "fp32"
    backend: str = "torch"  # torch | ctranslate2 (GPT and Transformer generators; serving.backend_ct2) | onnxruntime (classifiers)
    backends: Mapping[str, str] = field(default_factory=dict)  # per model name, over ``backend``
    max_running: int = 8
    max_queued: int = 64
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_input_tokens: int | None = None
    max_new_tokens: int = 1024
    pipeline: PipelineConfig | None = None
    policy: ReplyPolicy | None = None  # the hybrid reply policy (serving.policy), instead of a pipeline
    draft_tokens: int | None = None  # speculative greedy decoding from the bundle's replies; 0: off; None: per model

    def __post_init__(self) -> None:
        if not self.bundles and self.model_dir is None:
            raise ValueError("no bundles given; pass at least one name=path, or a model directory")
        if self.bundles and self.model_dir is not None:
            raise ValueError("pass bundles or a model directory, not both")
        if self.pins and self.model_dir is None:  # else ignored: the bundles given are served as they are
            raise ValueError(f"--pin chooses versions under --model-dir; the bundles given by name have no versions "
                             f"to pin ({', '.join(f'{n}={v}' for n, v in self.pins.items())})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: without them the server "
                             "would serve plaintext and check no client")
        if self.tls_cert is not None:  # before the port is bound: grpc reports bad TLS files as a failed bind
            TlsConfig(Path(self.tls_cert), Path(self.tls_key), self.tls_client_ca and Path(self.tls_client_ca)).check()
        if self.poll_interval <= 0:
            raise ValueError(f"poll_interval={self.poll_interval!r} is out of range; allowed: seconds > 0")
        if self.max_concurrent_streams is not None:
            _check_streams_bound(self.max_concurrent_streams)
        check_draft_tokens(self.draft_tokens)
        check_precision(self.precision)  # before the port is bound, not in the model loader's thread
        for b in (self.backend, *self.backends.values()):
            backend_ct2.check_backend(b)
        if "ctranslate2" in (self.backend, *self.backends.values()):
            backend_ct2.compute_type_for(self.precision)  # ctranslate2 missing, or no such compute type here
        if "onnxruntime" in (self.backend, *self.backends.values()):
            backend_ort.check_available(self.precision)  # onnxruntime missing, or bf16
        unknown = sorted(set(self.backends) - set(self.bundles)) if self.bundles else []
        if unknown:
            raise ValueError(f"--backend names model(s) {', '.join(unknown)} that are not served; "
                             f"served: {', '.join(self.bundles)}")
        # Frozen all the way down: the mappings are read-only copies, paths are Paths.
        object.__setattr__(self, "bundles", _frozen(self.bundles))
        object.__setattr__(self, "pins", _frozen(self.pins))
        object.__setattr__(self, "backends", _frozen(self.backends))
        for name in ("model_dir", "port_file", "api_keys_file", "tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    @property
    def streams_bound(self) -> int:
        """Streams one HTTP/2 connection may hold open: ``max_concurrent_streams``, or one model's engine capacity
        (``max_running + max_queued``) plus :data:`STREAM_HEADROOM`."""
        return self.max_concurrent_streams or default_max_concurrent_streams(self.max_running, self.max_queued)

    def engine_kwargs(self) -> dict[str, Any]:
        """The :class:`Engine` keyword arguments this configuration asks for."""
        return dict(max_running=self.max_running, max_queued=self.max_queued, max_batch_size=self.max_batch_size,
                    max_wait_ms=self.max_wait_ms, max_input_tokens=self.max_input_tokens,
                    max_new_tokens=self.max_new_tokens, pipeline=self.pipeline, policy=self.policy,
                    draft_tokens=self.draft_tokens)


def run_server(config: ServerConfig, *, settings=None) -> None:
    """Blocking entry point for the CLI: serve ``config``'s models until SIGTERM/SIGINT/SIGHUP.

    Wires the operations library from ``settings`` (default: ``CHATFORGE_*`` variables):
    logging, alerts, the conversation store and metrics (HTTP on ``config.metrics_port``); sizes torch's
    thread pool (``chatforge.runtime.configure_threads``, one CPU left to the server's own threads).
    """
    settings = settings or get_settings()
    # A log sink that stops taking lines (a pipe nobody reads) must not stop the server: lines go through a writer thread.
    [log_writer] = configure_logging(settings, background=True)
    # torch's pool from the CPUs this process may use (affinity, cgroup quota) less one for the server's own threads
    configure_threads(reserve=SERVING_RESERVED_CPUS)
    auth = ApiKeyAuth.from_file(config.api_keys_file, open_health=config.open_health) if config.api_keys_file \
        else ApiKeyAuth.from_env(open_health=config.open_health)
    tls = TlsConfig(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
    ops = operations(settings)
    kwargs = config.engine_kwargs()
    kwargs["metrics"] = ops["metrics"]
    ops["metrics"].watch_logs(log_writer)
    directory = ModelDirectory(config.model_dir, config.pins, config.precision, config.backend, config.backends) \
        if config.model_dir is not None else None
    if directory is not None:
        def loader():
            return directory.load_engine(**kwargs)
    else:
        named = dict(config.bundles)

        def loader():
            return Engine.from_bundles(named, precision=config.precision, backend=config.backend,
                                       backends=config.backends, **kwargs)

    try:
        asyncio.run(serve(loader, config.host, config.port, grace=config.grace, drain_delay=config.drain_delay,
                          port_file=config.port_file, metrics_port=config.metrics_port,
                          auth=auth, tls=tls, model_dir=directory, poll_interval=config.poll_interval,
                          max_message_bytes=config.max_message_bytes, http_port=config.http_port,
                          max_concurrent_streams=config.streams_bound, **ops))
    finally:
        store = ops["store"]
        store.close(timeout=STORE_FLUSH_TIMEOUT if store.available else STORE_OUTAGE_FLUSH_TIMEOUT)
        ops["alerts"].close(timeout=ALERTS_CLOSE_TIMEOUT)
        log_writer.flush()  # what the server logged is written before it returns (up to LOG_DRAIN_TIMEOUT_S)
