"""Starting a real ``lockgate serve`` and waiting for it: shared by bench/ and tests/.

Servers run as subprocesses (``python -m lockgate serve``), exactly as a user
starts them, on free loopback ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A loopback port nothing listens on (free now; the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_load(
    script: str, port: int, payload: bytes, concurrency: int, duration: float
) -> dict[str, Any]:
    """Run ``script --load PORT PAYLOAD_FILE CONCURRENCY DURATION`` and return its JSON summary.

    The load generator runs in its own process so that it does not share the
    benchmark's (or the server's) GIL; each bench script supplies its own
    ``--load`` entry point and prints one JSON object.
    """
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as handle:
        handle.write(payload)
    try:
        out = subprocess.run(
            [
                sys.executable,
                script,
                "--load",
                str(port),
                handle.name,
                str(concurrency),
                str(duration),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.unlink(handle.name)
    return dict(json.loads(out))


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a server: its supervisor, engine and front ends)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(") ", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def connection_counts(port: int, pids: list[int]) -> list[int]:
    """How many established connections to local ``port`` each of ``pids`` holds (/proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(fields[9])
    counts = []
    for pid in pids:
        count = 0
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        count += 1
        counts.append(count)
    return counts


def client_ports(server_port: int) -> set[int]:
    """Local ports of the established loopback connections to ``server_port`` (/proc)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                local, remote, state = line.split()[1:4]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == server_port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Return once the server's gRPC health check ("" service) says SERVING.

    Raises RuntimeError if ``process`` exits first, TimeoutError after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    request = health_pb2.HealthCheckRequest(service="")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before ready")
        # A new channel each try: one that failed to connect backs off for longer.
        with grpc.insecure_channel(url) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} not ready after {timeout:.0f} s")


@dataclass
class ServerProcess:
    """A running ``lockgate serve`` subprocess and its addresses."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    #: Where its stdout and stderr go; None: discarded.
    log_path: Path | None
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        if self.log_path is None:
            return "(output discarded)"
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


def launch_server(
    repository: Path | str,
    log_dir: Path | None,
    *extra: str,
    grpc_port: int | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 60.0,
    frontends: int = 1,
) -> ServerProcess:
    """Start ``lockgate serve`` on free loopback ports; by default wait until ready.

    Its output goes to ``log_dir/server-<port>.log`` (discarded if ``log_dir``
    is None). Readiness is not strict unless ``--strict-readiness`` is in
    ``extra``: the test repository holds a deliberately broken model, and
    strict readiness would keep such a server NOT_SERVING forever.
    ``frontends`` above 1 adds ``--frontends N`` (unless ``extra`` has one).
    """
    grpc_port = grpc_port or free_port()
    metrics_port = free_port()
    args = [
        *(sys.executable, "-m", "lockgate", "serve", "--model-repository", str(repository)),
        *("--host", "127.0.0.1", "--grpc-port", str(grpc_port)),
        *("--metrics-port", str(metrics_port)),
        *([] if "--strict-readiness" in extra else ["--no-strict-readiness"]),
        *([] if frontends == 1 or "--frontends" in extra else ["--frontends", str(frontends)]),
        *extra,
    ]
    log_path = None if log_dir is None else log_dir / f"server-{grpc_port}.log"
    with open(log_path or os.devnull, "wb") as log:
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = ServerProcess(process, grpc_port, metrics_port, log_path, args)
    if wait:
        try:
            wait_ready(server.url, process, timeout)
        except Exception:
            server.stop(5)
            raise RuntimeError(f"server failed to start:\n{server.log()}") from None
    return server
