"""Shared fixtures: real Lockgate servers on free loopback ports.

Servers run as subprocesses (``python -m lockgate serve``), exactly as a user
starts them; tests talk to them over gRPC with tritonclient and our SDK.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # models/build.py is a build script, not an installed package.
    sys.path.insert(0, str(ROOT))

from models.build import build_repository  # noqa: E402


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A running ``lockgate serve`` subprocess and its addresses."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the server and wait; kill it if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Block until the server's gRPC health check says SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode} before ready")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {url} not ready after {timeout} s")


def launch_server(
    repository: Path | str,
    log_dir: Path,
    *extra: str,
    grpc_port: int | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> ServerProcess:
    """Start ``lockgate serve`` on free loopback ports; wait until ready."""
    grpc_port = grpc_port or free_port()
    metrics_port = free_port()
    log_path = log_dir / f"server-{grpc_port}.log"
    args = [
        sys.executable,
        "-m",
        "lockgate",
        "serve",
        "--model-repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        # The test repository holds a deliberately broken model; strict
        # readiness would keep such a server NOT_SERVING forever.
        *([] if "--strict-readiness" in extra else ["--no-strict-readiness"]),
        *extra,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    server = ServerProcess(process, grpc_port, metrics_port, log_path, args)
    if wait:
        try:
            wait_ready(server.url, process)
        except Exception:
            server.stop(5)
            raise RuntimeError(f"server failed to start:\n{server.log()}") from None
    return server


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models plus the test models, built once per session."""
    repo = tmp_path_factory.mktemp("repository")
    build_repository(repo, with_test_models=True)
    return repo


@pytest.fixture(scope="session")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One shared server over the full test repository (control mode none)."""
    proc = launch_server(model_repository, tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory for servers private to one test; all are stopped afterwards."""
    started: list[ServerProcess] = []

    def start(repository: Path | str, *extra: str, **kwargs: object) -> ServerProcess:
        proc = launch_server(repository, tmp_path, *extra, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(10)
