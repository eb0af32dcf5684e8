"""Assembles the gRPC server and runs its lifecycle: start, serve, drain, stop.

Start: bind, report NOT_SERVING, load models, then SERVING. On SIGTERM or
SIGINT: NOT_SERVING and ServerReady=false at once, stop polling the
repository, refuse new inference (UNAVAILABLE) while health checks are still
answered, finish every accepted and queued request, then stop listening and
exit 0 within ``--drain-seconds``; a second signal exits at once (status 1).
A signal while models are still loading abandons the loads (each at its next
step: a session being created cannot be interrupted) and stops the same way.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from lockgate import tracing
from lockgate.config import ServerConfig
from lockgate.engine import Engine, LocalEngine
from lockgate.errors import LockgateError
from lockgate.health import HealthServicer, add_health_to_server
from lockgate.lifecycle import Lifecycle
from lockgate.poller import RepositoryPoller
from lockgate.repository import ModelRepository
from lockgate.servicer import Servicer, add_to_server
from lockgate.shm import SharedMemoryRegistry

log = logging.getLogger("lockgate.server")

#: Health service name that is SERVING whenever the process runs: for
#: liveness probes, which must not depend on model state.
LIVENESS_SERVICE = "liveness"
INFERENCE_SERVICE = "inference.GRPCInferenceService"
#: After the drain, how long a batch already running may take to finish.
RUNNING_BATCH_GRACE_S = 5.0


def grpc_options(config: ServerConfig, reuseport: bool = False) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        # Only front ends (--frontends N) share their port; a lone server must
        # not share it by accident with another process listening there.
        ("grpc.so_reuseport", int(reuseport)),
        # Clients may ping as often as every 10 s without being disconnected.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.grpc_max_connection_age:
        age_ms = int(config.grpc_max_connection_age * 1000)
        options.append(("grpc.max_connection_age_ms", age_ms))
        # In-flight calls on a recycled connection get the drain time to finish.
        options.append(("grpc.max_connection_age_grace_ms", int(config.drain_seconds * 1000)))
    if config.grpc_keepalive_time:
        options.append(("grpc.keepalive_time_ms", int(config.grpc_keepalive_time * 1000)))
        options.append(("grpc.keepalive_timeout_ms", 20_000))
    return options


class ListenError(OSError):
    """A port the server cannot listen on; the message names the flag to change."""


def check_port_free(host: str, port: int, purpose: str, flag: str) -> None:
    """Raise ListenError if something already listens on ``host:port``."""
    if port == 0:
        return  # any free port
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}: {exc.strerror}; change --host") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As the servers themselves bind: a port left in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ListenError(
                        f"{purpose} port {port} on {host} is already in use; "
                        f"choose another with {flag}"
                    ) from None
                raise ListenError(
                    f"cannot listen for {purpose} on {host}:{port}: {exc.strerror or exc}; "
                    f"change --host or {flag}"
                ) from None


def check_ports(config: ServerConfig) -> None:
    """Both ports, before listening on either.

    gRPC would log its own error line and raise a RuntimeError naming neither
    the port's use nor the flag.
    """
    check_port_free(config.host, config.grpc_port, "gRPC", "--grpc-port")
    if config.metrics:
        check_port_free(config.host, config.metrics_port, "metrics", "--metrics-port")


def serve_metrics(config: ServerConfig, repository: ModelRepository) -> Any:
    """Start /metrics (if on) for ``repository``; the HTTP server, for shutdown."""
    if not config.metrics:
        return None
    from lockgate.metrics import start_metrics_server

    try:
        return start_metrics_server(config, repository)
    except OSError as exc:
        raise ListenError(
            f"cannot serve metrics on {config.host}:{config.metrics_port}: "
            f"{exc.strerror or exc}; change --metrics-port (or --no-metrics)"
        ) from None


class LockgateServer:
    """One Lockgate process: gRPC services, model repository, metrics.

    A front-end process (``--frontends N``) runs a ``FrontendServer``, which
    overrides the methods under "the engine's side" below.
    """

    #: Signals that drain the server (a front end leaves SIGINT to its supervisor).
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
    #: Front ends share their port (SO_REUSEPORT).
    reuseport = False

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        #: Readiness, drain, abandoned loads: moved forward here only, read by every part.
        self.lifecycle = Lifecycle()
        #: None when tracing is off; given to the servicer and every version's scheduler.
        self.tracer = tracing.setup(config)
        #: The servicer's one way to the models.
        self.engine = self._make_engine()
        #: Client regions; owned here so they are unmapped at shutdown, never on unload.
        self.shared_memory = (
            self._make_shared_memory() if config.shared_memory == "system" else None
        )
        self.health = HealthServicer(config.max_health_watches)
        self.grpc_port = 0
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Event | None = None
        #: time.monotonic() of the first signal (or request_stop): the drain time counts from it.
        self._signalled_at: float | None = None
        #: Startup loading is over and readiness was published.
        self._started = False
        self._poller: RepositoryPoller | None = None
        self._metrics_server: Any = None

    def _make_shared_memory(self) -> SharedMemoryRegistry:
        """The registry of client regions (a front end's mirrors the engine's)."""
        return SharedMemoryRegistry()

    async def start(self) -> None:
        """Bind, load models, and report ready.

        A signal during startup ends it early, with the server not ready;
        ``serve`` then stops it at once.
        """
        self._stopping = asyncio.Event()
        self._check_repository()
        # Before anything slow: a pod scaled down while it loads gets SIGTERM
        # now, and the default handler would kill it mid-load (status -15).
        loop = asyncio.get_running_loop()
        for sig in self.signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._check_ports()
        from lockgate.security import auth_interceptors

        interceptors = auth_interceptors(self.config)
        server = grpc.aio.server(
            options=grpc_options(self.config, self.reuseport), interceptors=interceptors
        )
        servicer = Servicer(
            self.engine, self.lifecycle, self.config, self.tracer, self.shared_memory
        )
        add_to_server(servicer, server)
        add_health_to_server(self.health, server)
        reflection.enable_server_reflection(
            [INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self._register_descriptor()
        address = f"{self.config.host}:{self.config.grpc_port}"
        self.grpc_port = self._bind(server, address)
        self._server = server
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        log.info("gRPC listening on %s:%d", self.config.host, self.grpc_port)
        await self._start_engine()
        if self._stopping.is_set():
            return
        # Before the await: a signal from now on finds a started server to drain.
        self._started = True
        await self.update_health()

    def _bind(self, server: grpc.aio.Server, address: str) -> int:
        from lockgate.security import server_credentials

        credentials = server_credentials(self.config)
        try:
            port = (
                server.add_secure_port(address, credentials)
                if credentials is not None
                else server.add_insecure_port(address)
            )
        except RuntimeError:
            port = 0
        if port == 0:
            raise ListenError(f"cannot listen for gRPC on {address}; change --host or --grpc-port")
        return port

    @staticmethod
    def _register_descriptor() -> None:
        # Reflection finds the service by name in protobuf's default pool;
        # only the server registers it (see protos/.../inference_service.proto).
        from lockgate_client._proto import inference_service_pb2

        del inference_service_pb2

    # --- the engine's side (a front end overrides these) ------------------------------

    def _make_engine(self) -> Engine:
        observer = self.tracer.observe_batch if self.tracer is not None else None
        self.repository = ModelRepository(self.config, self.lifecycle, observer)
        return LocalEngine(self.repository, on_change=self.update_health)

    def _check_ports(self) -> None:
        check_ports(self.config)

    def _check_repository(self) -> None:
        # Before binding: a missing path, or two models under one name, is a
        # mistake to fix, not to serve around.
        self.repository.check_locations()
        self.repository.check_names()

    async def _start_engine(self) -> None:
        """Metrics, the startup loads, then the poller."""
        self._metrics_server = serve_metrics(self.config, self.repository)
        await self._load_models()
        assert self._stopping is not None
        if self.config.model_control_mode == "poll" and not self._stopping.is_set():
            self._poller = RepositoryPoller(
                self.repository, self.config.repository_poll_secs, self.update_health
            )
            self._poller.start()

    def _readiness(self) -> tuple[bool, dict[str, bool]]:
        """Whether every model is ready (strict readiness), and which models are."""
        ready_names = {m.name for m in self.repository.ready_models()}
        models = {name: name in ready_names for name in self.repository.names()}
        return self.repository.all_ready(), models

    async def _drain_engine(self) -> None:
        """Until every accepted request is answered."""
        await self.repository.drain()

    def _close_engine(self) -> None:
        self.repository.close()

    def _loaded_count(self) -> int:
        return len(self.repository.ready_models())

    async def _load_models(self) -> None:
        """Load the startup models, unless a signal comes first."""
        assert self._stopping is not None
        started = time.monotonic()
        mode = self.config.model_control_mode
        names = None if mode != "explicit" else self.config.load_models
        if names == ["*"]:
            names = None
        loading = asyncio.ensure_future(self.repository.load_all(names))
        signalled = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({loading, signalled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            signalled.cancel()
        if not loading.done():
            # The signal abandoned the loads; wait for them to give up. Loads run
            # in threads, which cannot be cancelled, and exiting under ONNX Runtime
            # aborts the process: let them stop, within the drain time.
            assert self._signalled_at is not None
            left = self.config.drain_seconds - (time.monotonic() - self._signalled_at)
            try:
                await asyncio.wait_for(asyncio.shield(loading), max(0.0, left))
            except TimeoutError:
                log.warning("a model is still loading: exiting without waiting for it")
                logging.shutdown()
                os._exit(0)
            except LockgateError:
                pass  # collected below
        try:
            loading.result()
        except LockgateError as exc:
            if not self._stopping.is_set():
                # Reported per model in the index; the others keep serving.
                log.warning("not every model loaded: %s", exc.message)
        if self._stopping.is_set():
            return  # the drain's last line says what was loaded
        log.info(
            "%d model version(s) ready in %.2f s",
            len(self.repository.ready_models()),
            time.monotonic() - started,
        )

    async def update_health(self) -> None:
        """Publish readiness: server-wide and per model (service = model name)."""
        all_ready, models = self._readiness()
        ready = not self.lifecycle.draining and (all_ready or not self.config.strict_readiness)
        self.lifecycle.ready = ready
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", serving if ready else not_serving)
        await self.health.set(INFERENCE_SERVICE, serving if ready else not_serving)
        for name, model_ready in models.items():
            model_ok = model_ready and not self.lifecycle.draining
            await self.health.set(name, serving if model_ok else not_serving)

    async def serve(self) -> None:
        """Run until a signal asks us to drain; then drain and stop."""
        assert self._stopping is not None
        await self._stopping.wait()
        await self.drain()

    def _on_signal(self, sig: int) -> None:
        assert self._stopping is not None
        name = signal.Signals(sig).name
        if self._stopping.is_set():
            log.warning("second %s: exiting now", name)
            os._exit(1)
        if self._started:
            log.info("%s: draining (up to %.0f s)", name, self.config.drain_seconds)
        else:
            log.info(
                "%s during startup: abandoning the model loads, then stopping (up to %.0f s)",
                name,
                self.config.drain_seconds,
            )
        self._begin_stop()

    def _begin_stop(self) -> None:
        assert self._stopping is not None
        self._signalled_at = time.monotonic()
        # At once, not when the drain starts: a load thread reads it between steps.
        self.lifecycle.loads_abandoned.set()
        self._stopping.set()

    async def drain(self) -> None:
        """Stop taking requests, finish accepted ones, shut down."""
        self.lifecycle.draining = True
        if self._poller is not None:
            # A draining server must not load or unload models under its drain.
            self._poller.stop()
        # Liveness stays SERVING: a draining server is healthy, just leaving.
        await self.update_health()
        started = self._signalled_at if self._signalled_at is not None else time.monotonic()
        # Keep listening while accepted and queued requests finish, so probes
        # read NOT_SERVING (liveness SERVING) instead of a refused connection;
        # meanwhile the servicer refuses new inference with UNAVAILABLE.
        # (Even stopped during startup: requests to the models loaded by then
        # may have been accepted.)
        left = self.config.drain_seconds - (time.monotonic() - started)
        try:
            await asyncio.wait_for(self._drain_engine(), max(0.0, left))
        except TimeoutError:
            # Set before the gRPC server cancels them: their failures are then
            # reported as the server's doing, not their callers'.
            self.lifecycle.drain_expired = True
            log.warning("drain time is up: cancelling the requests still queued or running")
        if self._server is not None:
            # Stops listening (GOAWAY); replies being written get what is left.
            left = self.config.drain_seconds - (time.monotonic() - started)
            await self._server.stop(grace=max(0.0, left))
        self._close_engine()
        if self.shared_memory is not None:
            # Requests still running keep theirs mapped until they finish.
            self.shared_memory.close()
        # A running batch cannot be interrupted, and exiting under it makes ONNX
        # Runtime abort the process (SIGABRT): let it finish, within bounds.
        try:
            await asyncio.wait_for(self._drain_engine(), RUNNING_BATCH_GRACE_S)
            stuck = False
        except TimeoutError:
            stuck = True
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.tracer is not None:
            self.tracer.shutdown()  # flushes the spans still buffered
        if self._started:
            log.info("drained and stopped in %.2f s", time.monotonic() - started)
        else:
            log.info(
                "stopped during startup in %.2f s, with %d model version(s) loaded",
                time.monotonic() - started,
                self._loaded_count(),
            )
        if stuck:
            log.warning("a batch is still running: exiting without waiting for it")
            logging.shutdown()
            os._exit(0)

    async def abort(self) -> None:
        """Tear down after a failed start."""
        if self._server is not None:
            await self._server.stop(0)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    def request_stop(self) -> None:
        """Drain and stop, as the first SIGTERM does (for embedding and tests)."""
        if self._stopping is not None and not self._stopping.is_set():
            self._begin_stop()
