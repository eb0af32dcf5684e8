"""What many tests need: starting servers, building requests, raw RPCs, metrics, certificates.

Fixtures live in conftest.py; the plain helpers live here so a test imports
them by name (``from support import simple_inputs``). Starting a server is
shared with the benchmarks (``bench/serving.py``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # models/build.py and bench/ are scripts, not installed packages.
    sys.path.insert(0, str(ROOT))

from bench.serving import (  # noqa: E402
    ServerProcess,
    client_ports,
    connection_counts,
    free_port,
    launch_server,
    process_tree,
    wait_ready,
)

__all__ = [
    "ROOT",
    "SERVICE",
    "ServerProcess",
    "client_ports",
    "connection_counts",
    "free_port",
    "launch_server",
    "make_certificates",
    "metric",
    "process_tree",
    "rpc",
    "scrape",
    "simple_arrays",
    "simple_inputs",
    "stub",
    "wait_ready",
]

Array = npt.NDArray[Any]
Reply = TypeVar("Reply")

#: Method path prefix of Triton's inference service.
SERVICE = "/inference.GRPCInferenceService/"


# --- requests for the `simple` model (two INT32 [-1, 16] inputs) ---------------------------


def simple_arrays(rows: int = 1) -> dict[str, Array]:
    """INPUT0 = 0, 1, 2, ... and INPUT1 = 3 everywhere, ``rows`` rows of 16."""
    a = np.arange(16 * rows, dtype=np.int32).reshape(rows, 16)
    return {"INPUT0": a, "INPUT1": np.full((rows, 16), 3, dtype=np.int32)}


def simple_inputs(
    a: Array | None = None, b: Array | None = None, *, rows: int = 1, datatype: str = "INT32"
) -> list[tc.InferInput]:
    """tritonclient inputs for ``simple``: ``a`` and ``b`` (default: 0..16*rows-1 both).

    ``datatype`` other than INT32 makes a request the model refuses.
    """
    if a is None:
        dtype = np.int32 if datatype == "INT32" else tc.triton_to_np_dtype(datatype)
        a = np.arange(16 * rows).astype(dtype).reshape(rows, 16)
    b = a if b is None else b
    inputs = [tc.InferInput(f"INPUT{i}", list(a.shape), datatype) for i in range(2)]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


# --- raw gRPC --------------------------------------------------------------------------------


def stub(channel: grpc.Channel, method: str, response_type: type[Reply]) -> Callable[..., Reply]:
    """A callable for ``inference.GRPCInferenceService/<method>`` taking protobuf messages."""
    call: Callable[..., Reply] = channel.unary_unary(
        SERVICE + method,
        request_serializer=_serialize,
        response_deserializer=response_type.FromString,  # type: ignore[attr-defined]
    )
    return call


def rpc(
    channel: grpc.Channel, method: str, request: Any, response_type: type[Reply], **kwargs: Any
) -> Reply:
    """Call ``inference.GRPCInferenceService/<method>`` once; ``kwargs`` go to the call."""
    return stub(channel, method, response_type)(request, **kwargs)


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


# --- metrics ---------------------------------------------------------------------------------


def scrape(server: ServerProcess) -> str:
    """The server's /metrics exposition."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


def metric(text: str, name: str, **labels: str) -> float | None:
    """The one sample ``name{labels...}`` in an exposition (labels: a subset); None if absent."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    found = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            label_text, value = line[len(name) + 1 :].rsplit("} ", 1)
            if want <= set(label_text.split(",")):
                found.append(float(value))
        elif not labels and line.startswith(name + " "):
            found.append(float(line.split()[1]))
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


# --- certificates ----------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2"),
        *("-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=d,
    )


def _make_leaf(d: Path, name: str, ca: str, usage: str, san: str) -> None:
    (d / f"{name}.ext").write_text(
        f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\nsubjectAltName={san}\n"
    )
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"),
        cwd=d,
    )
    _openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"),
        *("-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext"),
        cwd=d,
    )


def make_certificates(d: Path) -> Path:
    """Two CAs (``ca``, ``ca2``) and, as NAME.pem/NAME.key in ``d``: ``server`` (from ca)
    and ``rotated`` (from ca2) for localhost/127.0.0.1, and a ``client`` certificate.

    Skips the test where the openssl command is missing.
    """
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to generate test certificates")
    _make_ca(d, "ca")
    _make_ca(d, "ca2")
    local = "DNS:localhost,IP:127.0.0.1"
    _make_leaf(d, "server", "ca", "serverAuth", local)
    _make_leaf(d, "rotated", "ca2", "serverAuth", local)
    _make_leaf(d, "client", "ca", "clientAuth", "DNS:client")
    return d
