"""What every script here needs to drive a server it starts: a port, and a readiness wait."""

from __future__ import annotations

import socket
import subprocess
import time

import grpc

from lockgate_client._proto import grpc_service_pb2 as pb

READY = "/inference.GRPCInferenceService/ServerReady"


def free_port() -> int:
    """A loopback port nothing listens on (free now; the server binds it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Return once ServerReady at ``url`` says ready.

    Raises RuntimeError if ``process`` exits first, TimeoutError after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    request = pb.ServerReadyRequest().SerializeToString()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        # A new channel each try: one that failed to connect backs off for longer.
        with grpc.insecure_channel(url) as channel:
            try:
                reply = channel.unary_unary(READY)(request, timeout=2)
                if pb.ServerReadyResponse.FromString(reply).ready:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"the server at {url} was not ready within {timeout:.0f} s")
