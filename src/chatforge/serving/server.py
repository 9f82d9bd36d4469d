"""The grpc.aio server: Chatbot + standard health checking + reflection, signals, drain.

Lifecycle (what a load balancer / Kubernetes sees):

1. bind the port and start: health says NOT_SERVING for "" and "chatforge.v1.Chatbot";
   Chatbot calls answer UNAVAILABLE ("still loading");
2. load the models in a worker thread (the event loop keeps answering health checks);
3. health -> SERVING; the bound port is written (atomically) to ``port_file``;
4. SIGTERM/SIGINT -> health NOT_SERVING (``enter_graceful_shutdown``), then
   ``server.stop(grace)``: in-flight calls get ``grace`` seconds, new ones are refused;
   the engine is closed and ``serve`` returns (exit code 0).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatforge.serving.engine import Engine
from chatforge.serving.interceptors import RequestContextInterceptor
from chatforge.serving.service import SERVICE_NAME, ChatbotServicer
from chatforge.v1 import chatbot_pb2_grpc

logger = logging.getLogger(__name__)

# Keepalive, consistent with chatforge.serving.client (client pings every 30 s):
# - the server pings idle connections every 60 s (timeout 20 s) to drop dead peers that
#   vanished without a FIN (NAT, crashed VM), also when no call is open (permit_without_calls);
# - it accepts client pings as often as every 10 s without data, well below the client's 30 s,
#   so a well-behaved client is never answered with GOAWAY "too_many_pings";
# - so_reuseport=0: a second server on a taken port fails to bind instead of silently sharing it.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
)

HEALTH_SERVICES = ("", SERVICE_NAME)

EngineOrLoader = Engine | Callable[[], Engine]


def write_port_file(path: str | Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ChatbotServer:
    """One grpc.aio server hosting the Chatbot service, health checking and reflection.

    Health semantics follow the gRPC health checking protocol
    (https://github.com/grpc/grpc/blob/master/doc/health-checking.md).
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
    ) -> None:
        if not (0 <= port <= 65535):
            raise ValueError(f"port={port!r} is out of range; allowed: 0 (ephemeral) to 65535")
        if grace < 0:
            raise ValueError(f"grace={grace!r} is out of range; allowed: a number of seconds >= 0")
        self._engine_or_loader = engine_or_loader
        self.host, self.requested_port, self.grace = host, port, grace
        self.port_file = Path(port_file) if port_file is not None else None
        # Later options override the defaults (grpc keeps the last value of a key).
        self._options = list(SERVER_OPTIONS) + list(options)
        self.servicer = ChatbotServicer()
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.serving = asyncio.Event()
        self._shutdown_requested = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._load_task: asyncio.Task | None = None

    @property
    def engine(self) -> Engine | None:
        return self.servicer.engine

    async def start(self) -> int:
        """Bind, start answering (NOT_SERVING), start loading the models; return the bound port."""
        server = grpc.aio.server(interceptors=[RequestContextInterceptor()], options=self._options)
        chatbot_pb2_grpc.add_ChatbotServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.host}:{self.requested_port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot bind {address}: {e}") from None
        if self.port == 0:  # older grpcio signals a bind failure by returning 0
            raise OSError(f"cannot bind {address}: the port is taken or the address is not local")
        await server.start()
        self._server = server
        logger.info("listening", extra={"address": f"{self.host}:{self.port}"})
        self._load_task = asyncio.get_running_loop().create_task(self._load())
        return self.port

    async def _load(self) -> None:
        if isinstance(self._engine_or_loader, Engine):
            engine = self._engine_or_loader
        else:
            # Loading reads files and builds torch models: never on the event loop.
            engine = await _in_daemon_thread(self._engine_or_loader)
            if not isinstance(engine, Engine):
                raise TypeError(f"the loader returned {type(engine).__name__}; expected an Engine")
        if self._shutdown_requested.is_set():
            engine.close()
            return
        self.servicer.engine = engine
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
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
        """NOT_SERVING first (so balancers stop sending), then drain for ``grace`` seconds and stop."""
        grace = self.grace if grace is None else grace
        self._shutdown_requested.set()
        await self.health.enter_graceful_shutdown()
        logger.info("shutting down", extra={"grace_s": grace})
        if self._server is not None:
            await self._server.stop(grace)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.servicer.engine is not None:
            self.servicer.engine.close()
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
) -> None:
    """Serve until SIGTERM/SIGINT; return after a graceful shutdown.

    ``engine_or_loader`` is an :class:`Engine` or a no-argument callable that builds one
    (run in a thread after the port is bound). ``port=0`` picks a free port; the bound
    port is written to ``port_file`` once SERVING. ``ready_event`` is set at the same time.
    Signal handlers are installed only when ``handle_signals`` and on the main thread.
    """
    server = ChatbotServer(engine_or_loader, host, port, grace=grace, port_file=port_file, options=options)
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


def run_server(
    bundles: Mapping[str, str | Path],
    host: str = "127.0.0.1",
    port: int = 50051,
    grace: float = 10.0,
    port_file: str | Path | None = None,
) -> None:
    """Blocking entry point for the CLI: serve the named bundles until SIGTERM/SIGINT."""
    if not bundles:
        raise ValueError("no bundles given; pass at least one name=path")
    bundles = dict(bundles)
    asyncio.run(serve(lambda: Engine.from_bundles(bundles), host, port, grace=grace, port_file=port_file))
