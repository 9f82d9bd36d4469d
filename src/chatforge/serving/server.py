"""The grpc.aio server: Chatbot + standard health checking + reflection, signals, drain.

Lifecycle (what a load balancer / Kubernetes sees). Two health services:
*liveness* ``""`` (the process is up) and *readiness* ``chatforge.v1.Chatbot`` (send me traffic).

1. bind the port and start: liveness SERVING, readiness NOT_SERVING; Chatbot calls answer
   UNAVAILABLE ("still loading");
2. load the models in a worker thread (the event loop keeps answering health checks);
3. readiness -> SERVING; the bound port is written (atomically) to ``port_file``;
4. SIGTERM/SIGINT -> drain: readiness NOT_SERVING at once (balancers and clients that watch
   health stop picking us), new Chatbot calls answer UNAVAILABLE (clients retry elsewhere),
   in-flight calls get ``grace`` seconds to finish, the conversation store is flushed, then
   the gRPC server stops, liveness goes NOT_SERVING last, and ``serve`` returns (exit 0).

Why not ``HealthServicer.enter_graceful_shutdown()`` at step 4: it sets *every* service to
NOT_SERVING (and ignores later changes), so a liveness probe would see the pod as dead
while it is still finishing streams, and could restart it mid-drain. The split is explicit
here: only readiness flips at the start of the drain; ``enter_graceful_shutdown`` runs at
the very end. Likewise ``server.stop(grace)`` alone would refuse health checks at once, so
the drain refuses Chatbot calls in the interceptor (``CallGate``) while health keeps answering.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatforge.fileio import atomic_write_text
from chatforge.serving.alert_rules import AlertRules, RollingCallStats
from chatforge.serving.engine import Engine, ModelDirectory, ModelDirectoryWatcher
from chatforge.serving.interceptors import CallGate, RequestContextInterceptor
from chatforge.serving.service import SERVICE_NAME, ChatbotServicer
from chatforge.v1 import chatbot_pb2_grpc

logger = logging.getLogger(__name__)

# Connection management, consistent with chatforge.serving.client (client pings every 30 s):
# - the server pings idle connections every 60 s (timeout 20 s) to drop dead peers that
#   vanished without a FIN (NAT, crashed VM), also when no call is open (permit_without_calls);
# - it accepts client pings as often as every 10 s without data, well below the client's 30 s,
#   so a well-behaved client is never answered with GOAWAY "too_many_pings";
# - max_connection_age (5 min + 1 min grace for open streams): the server closes each connection
#   politely (GOAWAY) after a while, so clients reconnect and an L4 balancer, which balances
#   connections and not calls, spreads load onto new replicas; the jitter grpc adds avoids
#   reconnect storms. Clients retry the GOAWAY'd (unstarted) calls transparently;
# - so_reuseport=0: a second server on a taken port fails to bind instead of silently sharing it.
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

LIVENESS, READINESS = "", SERVICE_NAME
HEALTH_SERVICES = (LIVENESS, READINESS)

EngineOrLoader = Engine | Callable[[], Engine]


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
    ) -> None:
        if not (0 <= port <= 65535):
            raise ValueError(f"port={port!r} is out of range; allowed: 0 (ephemeral) to 65535")
        if grace < 0:
            raise ValueError(f"grace={grace!r} is out of range; allowed: a number of seconds >= 0")
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ValueError(f"metrics_port={metrics_port!r} is out of range; allowed: 0 to 65535")
        if max_message_bytes is not None and max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={max_message_bytes!r} is out of range; allowed: >= 1024")
        if metrics_port is not None and metrics is None:
            from chatforge.serving.metrics import ServingMetrics

            metrics = ServingMetrics()
        self._engine_or_loader = engine_or_loader
        self.host, self.requested_port, self.grace = host, port, grace
        self.port_file = Path(port_file) if port_file is not None else None
        # Later options override the defaults; deduplicated so no grpc version has to choose.
        merged = dict(SERVER_OPTIONS)
        if max_message_bytes is not None:
            merged["grpc.max_receive_message_length"] = max_message_bytes
            merged["grpc.max_send_message_length"] = max_message_bytes
        merged.update(dict(options))
        self._options = list(merged.items())
        self.metrics, self.metrics_port, self.alerts, self.store = metrics, metrics_port, alerts, store
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
        self._shutdown_requested = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._load_task: asyncio.Task | None = None
        # The HTTP surface (serving/http.py): same loop, engine, gate, auth and metrics as gRPC.
        self.http = None
        if http_port is not None:
            from chatforge.serving.http import HttpSurface

            self.http = HttpSurface(self, host, http_port)

    @property
    def engine(self) -> Engine | None:
        return self.servicer.engine

    async def _set_readiness(self, status: int) -> None:
        await self.health.set(READINESS, status)
        self.ready = status == health_pb2.HealthCheckResponse.SERVING
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        logger.info("readiness %s", name, extra={"service": READINESS, "status": name})
        if self.alerts is not None:
            self.alerts.health_changed(READINESS, name)

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
        logger.info("listening", extra={"address": f"{self.host}:{self.port}", "tls": self.tls is not None,
                                        "api_keys": self.auth is not None})
        if self.metrics_port is not None:
            from chatforge.serving.metrics import MetricsHTTPServer

            self.metrics_http = MetricsHTTPServer(self.metrics, self.host, self.metrics_port,
                                                  readiness=lambda: self.ready).start()
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
            self.watcher = ModelDirectoryWatcher(engine, self.model_dir, poll_interval=self.poll_interval,
                                                 on_load_error=on_load_error).start()
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
            logger.error("loading the models failed; shutting down", exc_info=load_error)
        else:
            await self._shutdown_requested.wait()
        stop_wait.cancel()
        await self.shutdown()
        if load_error is not None:
            raise load_error

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain (see the module docstring): readiness off, refuse new calls, finish in-flight ones."""
        grace = self.grace if grace is None else grace
        self._shutdown_requested.set()
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.gate.draining = True
        logger.info("shutting down", extra={"grace_s": grace, "in_flight": self.gate.in_flight})
        if not await self.gate.wait_idle(grace):
            logger.warning("grace period over; cancelling %d unfinished calls", self.gate.in_flight,
                           extra={"in_flight": self.gate.in_flight})
        if self.watcher is not None:
            self.watcher.stop()
        if self._rules_task is not None:
            self._rules_task.cancel()
        if self.http is not None:
            await self.http.stop()  # its calls were drained through the same gate
        if self._server is not None:
            # Whatever is left (calls past the grace) is cancelled now.
            await self._server.stop(0.5 if self.gate.in_flight == 0 else 0)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.servicer.engine is not None:
            self.servicer.engine.close()
        if self.store is not None:
            # Every acknowledged turn reaches the database before the process exits.
            if not await asyncio.to_thread(self.store.flush, 30.0):
                logger.error("conversation store flush timed out during shutdown")
        if self.alerts is not None:
            await asyncio.to_thread(self.alerts.flush, 5.0)
        if self.metrics_http is not None:
            self.metrics_http.stop()
        await self.health.enter_graceful_shutdown()  # liveness last: the process is about to exit
        logger.info("stopped")


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
    grace: float = 10.0,
    port_file: str | Path | None = None,
    ready_event: asyncio.Event | threading.Event | None = None,
    options: Sequence[tuple[str, object]] = (),
    handle_signals: bool = True,
    **server_kwargs,
) -> None:
    """Serve until SIGTERM/SIGINT; return after a graceful shutdown.

    ``engine_or_loader`` is an :class:`Engine` or a no-argument callable that builds one
    (run in a thread after the port is bound). ``port=0`` picks a free port; the bound
    port is written to ``port_file`` once SERVING. ``ready_event`` is set at the same time.
    Signal handlers are installed only when ``handle_signals`` and on the main thread.
    ``server_kwargs`` go to :class:`ChatbotServer` (metrics, alerts, store, auth, tls, ...).
    """
    server = ChatbotServer(engine_or_loader, host, port, grace=grace, port_file=port_file, options=options,
                           **server_kwargs)
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
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
    from chatforge.serving.alerts import AlertManager
    from chatforge.serving.metrics import ServingMetrics
    from chatforge.serving.store import ConversationStore

    alerts = AlertManager.from_settings(settings)
    rules = AlertRules(alerts, RollingCallStats(settings.alert_window_seconds),
                       error_rate=settings.alert_error_rate, p99_seconds=settings.alert_p99_ms / 1000.0,
                       min_calls=settings.alert_min_calls)
    return {"metrics": ServingMetrics(), "alerts": alerts, "alert_rules": rules,
            "store": ConversationStore.from_settings(settings)}


def run_server(
    bundles: Mapping[str, str | Path] | None = None,
    host: str = "127.0.0.1",
    port: int = 50051,
    grace: float = 10.0,
    port_file: str | Path | None = None,
    *,
    model_dir: str | Path | None = None,
    pins: Mapping[str, str] | None = None,
    poll_interval: float = 5.0,
    metrics_port: int | None = None,
    api_keys_file: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    tls_client_ca: str | Path | None = None,
    open_health: bool = True,
    max_message_bytes: int | None = None,
    engine_kwargs: Mapping[str, object] | None = None,
    settings=None,
    precision: str = "fp32",
    http_port: int | None = None,
) -> None:
    """Blocking entry point for the CLI: serve bundles (or a model directory) until SIGTERM/SIGINT.

    Wires the operations library from ``settings`` (default: ``CHATFORGE_*`` variables):
    logging, alerts, the conversation store and metrics (HTTP on ``metrics_port``).
    """
    from chatforge.inference import check_precision
    from chatforge.serving.observability import configure_logging
    from chatforge.serving.security import ApiKeyAuth, TlsConfig
    from chatforge.settings import get_settings

    if not bundles and model_dir is None:
        raise ValueError("no bundles given; pass at least one name=path, or a model directory")
    if bundles and model_dir is not None:
        raise ValueError("pass bundles or a model directory, not both")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    check_precision(precision)  # before the port is bound, not in the model loader's thread
    settings = settings or get_settings()
    configure_logging(settings)
    auth = ApiKeyAuth.from_file(api_keys_file, open_health=open_health) if api_keys_file else \
        ApiKeyAuth.from_env(open_health=open_health)
    tls = TlsConfig(Path(tls_cert), Path(tls_key), Path(tls_client_ca) if tls_client_ca else None) \
        if tls_cert else None
    ops = operations(settings)
    metrics, alerts, store = ops["metrics"], ops["alerts"], ops["store"]
    kwargs = dict(engine_kwargs or {})
    kwargs["metrics"] = metrics
    directory = ModelDirectory(model_dir, pins, precision) if model_dir is not None else None
    if directory is not None:
        def loader():
            return directory.load_engine(**kwargs)
    else:
        named = dict(bundles)

        def loader():
            return Engine.from_bundles(named, precision=precision, **kwargs)

    try:
        asyncio.run(serve(loader, host, port, grace=grace, port_file=port_file,
                          metrics_port=metrics_port if metrics_port is not None else None,
                          auth=auth, tls=tls, model_dir=directory, poll_interval=poll_interval,
                          max_message_bytes=max_message_bytes, http_port=http_port, **ops))
    finally:
        store.close()
        alerts.close()
