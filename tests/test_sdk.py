"""The SDK against real servers: every call, every datatype, errors, resilience.

Uses the session ``server`` (full test repository) for read-only calls, and
private servers from ``start_server`` for restarts, replicas, TLS and auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import helper
from support import (
    ServerProcess,
    client_ports,
    connection_counts,
    free_port,
    process_tree,
    simple_arrays,
)

from lockgate_client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    InferenceError,
    InvalidInputError,
    LockgateError,
    ModelNotFoundError,
    PermissionDeniedError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)
from lockgate_client._tracing import trace_metadata
from lockgate_client.datatypes import WIRE_DTYPES
from models.build import Tensor, write_single

StartServer = Callable[..., ServerProcess]

IDENTITY_TYPES = [
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "fp16",
    "fp32",
    "fp64",
    "string",
    "bf16",
]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def small_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only ``simple``: private servers start fast and are always fully ready."""
    repo = tmp_path_factory.mktemp("small-repository")
    shutil.copytree(model_repository / "simple", repo / "simple")
    return repo


# Health, metadata, statistics, repository


def test_health_and_metadata(client: Client) -> None:
    assert client.is_live() is True
    assert isinstance(client.is_ready(), bool)
    assert client.is_ready("simple") is True
    assert client.is_ready("simple", "1") is True

    server_meta = client.server_metadata()
    assert server_meta.name and server_meta.version

    meta = client.metadata("simple")
    assert meta.name == "simple"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ]
    assert [t.name for t in meta.outputs] == ["OUTPUT0", "OUTPUT1"]

    config = client.config("simple")
    assert config.name == "simple"
    assert config.max_batch_size == 8


def test_models_and_statistics(client: Client) -> None:
    index = {(m.name, m.version): m for m in client.models()}
    assert index[("simple", "1")].state == "READY"
    broken = [m for (name, _), m in index.items() if name == "broken"]
    assert broken and broken[0].state != "READY" and broken[0].reason
    ready_only = client.models(ready=True)
    assert all(m.state == "READY" for m in ready_only)

    before = client.statistics("simple")
    assert [s.name for s in before] == ["simple"]
    client.infer("simple", simple_arrays(rows=2))
    after = client.statistics("simple")[0]
    assert after.inference_count == before[0].inference_count + 2
    assert after.inference_stats.success.count >= 1
    assert len(client.statistics()) > 1


# Inference


def test_infer_simple(client: Client) -> None:
    inputs = simple_arrays(rows=3)
    outputs = client.infer("simple", inputs)
    assert set(outputs) == {"OUTPUT0", "OUTPUT1"}
    np.testing.assert_array_equal(outputs["OUTPUT0"], inputs["INPUT0"] + inputs["INPUT1"])
    np.testing.assert_array_equal(outputs["OUTPUT1"], inputs["INPUT0"] - inputs["INPUT1"])

    only = client.infer(
        "simple",
        inputs,
        outputs=["OUTPUT1"],
        version="1",
        timeout=10,
        priority=1,
        request_id="r1",
        queue_timeout=5.0,
    )
    assert list(only) == ["OUTPUT1"]

    # Plain lists work with a datatype override.
    lists = client.infer(
        "simple",
        {"INPUT0": [[1] * 16], "INPUT1": [[2] * 16]},
        datatypes={"INPUT0": "INT32", "INPUT1": "INT32"},
    )
    assert lists["OUTPUT0"].tolist() == [[3] * 16]


def identity_input(kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    if kind == "string":
        # ONNX Runtime string tensors hold text: random UTF-8, multi-byte included.
        alphabet = [*"abc xyz019,;-", "é", "ß", "€", "日本", "🙂"]
        items = [
            "".join(rng.choice(alphabet, rng.integers(0, 8))).encode()
            for _ in range(shape[0] * shape[1])
        ]
        array = np.empty(len(items), dtype=np.object_)
        array[:] = items
        return array.reshape(shape)
    if kind == "bf16":
        # Values bfloat16 holds exactly, so the round trip must be exact.
        bits = rng.integers(0, 2**16, shape, dtype=np.uint32).astype(np.uint32) << 16
        values = bits.view(np.float32)
        return np.where(np.isfinite(values), values, np.float32(1.0)).astype(np.float32)
    if kind == "bool":
        return rng.integers(0, 2, shape).astype(np.bool_)
    dtype = WIRE_DTYPES[kind.upper()]
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype.str)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("kind", IDENTITY_TYPES)
def test_identity_round_trip(client: Client, kind: str) -> None:
    rng = np.random.default_rng(IDENTITY_TYPES.index(kind))
    model = f"identity_{kind}"
    for shape in [(1, 1), (3, 7), (8, 33)]:
        array = identity_input(kind, rng, shape)
        datatypes = {"INPUT0": "BF16"} if kind == "bf16" else None
        out = client.infer(model, {"INPUT0": array}, datatypes=datatypes)["OUTPUT0"]
        assert out.shape == array.shape
        if kind == "string":
            assert out.dtype == np.object_
            assert out.tolist() == array.tolist()
        elif kind == "bf16":
            assert out.dtype == np.float32
            np.testing.assert_array_equal(out, array)
        else:
            assert out.dtype == array.dtype
            np.testing.assert_array_equal(out, array)


def test_bf16_rounding_and_ml_dtypes(client: Client) -> None:
    values = np.array([[1.0, 1.00390625, 3.14159265, -2.5e-3]], dtype=np.float32)
    out = client.infer("identity_bf16", {"INPUT0": values}, datatypes={"INPUT0": "BF16"})
    ml_dtypes = pytest.importorskip("ml_dtypes")
    expected = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(out["OUTPUT0"], expected)
    out = client.infer("identity_bf16", {"INPUT0": values.astype(ml_dtypes.bfloat16)})
    np.testing.assert_array_equal(out["OUTPUT0"], expected)


def test_strings_and_bytes(client: Client) -> None:
    text = np.array([["héllo", "", "wörld"]], dtype=np.str_)
    out = client.infer("identity_string", {"INPUT0": text})["OUTPUT0"]
    assert out.tolist() == [[b"h\xc3\xa9llo", b"", b"w\xc3\xb6rld"]]
    numbers = client.infer(
        "simple_string",
        {
            "INPUT0": np.array([[str(i) for i in range(16)]], dtype=object),
            "INPUT1": np.array([["1"] * 16], dtype=object),
        },
    )
    assert [int(x) for x in numbers["OUTPUT0"][0]] == [i + 1 for i in range(16)]


def test_large_tensor(client: Client) -> None:
    array = np.random.default_rng(0).standard_normal((2, 2_000_000)).astype(np.float32)  # 16 MB
    out = client.infer("identity_fp32", {"INPUT0": array})["OUTPUT0"]
    np.testing.assert_array_equal(out, array)


def test_versions(client: Client) -> None:
    x = np.arange(8, dtype=np.int32).reshape(2, 4)
    out = client.infer("versioned", {"INPUT0": x}, version="3")["OUTPUT0"]
    np.testing.assert_array_equal(out, x + 3)
    np.testing.assert_array_equal(client.infer("versioned", {"INPUT0": x})["OUTPUT0"], x + 3)
    # Only the latest version is loaded.
    with pytest.raises((ModelNotFoundError, UnavailableError)):
        client.infer("versioned", {"INPUT0": x}, version="1")


# Errors


def test_error_mapping(client: Client) -> None:
    with pytest.raises(ModelNotFoundError) as not_found:
        client.infer("no_such_model", simple_arrays())
    assert not_found.value.code == grpc.StatusCode.NOT_FOUND
    assert "no_such_model" in not_found.value.message
    with pytest.raises(ModelNotFoundError):
        client.metadata("no_such_model")

    wrong = {"INPUT0": np.zeros((1, 16), np.float32), "INPUT1": np.zeros((1, 16), np.int32)}
    with pytest.raises(InvalidInputError) as invalid:
        client.infer("simple", wrong)
    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.value.message
    assert isinstance(invalid.value, LockgateError)

    with pytest.raises(DeadlineExceededError):
        client.infer("slow", {"INPUT0": np.zeros((1, 256), np.float32)}, timeout=0.005)


def test_unreachable_server() -> None:
    """Health calls answer False, as their bool contract says; other calls raise."""
    url = f"127.0.0.1:{free_port()}"
    with Client(url, retries=3) as c:
        assert c.is_live(timeout=5) is False
        assert c.is_ready(timeout=5) is False
        assert c.is_ready("simple", timeout=5) is False
        with pytest.raises(UnavailableError):
            c.infer("simple", simple_arrays(), timeout=5, retries=0)

    async def main() -> None:
        async with AsyncClient(url) as a:
            assert await a.is_live(timeout=5) is False
            assert await a.is_ready("simple", timeout=5) is False
            with pytest.raises(UnavailableError):
                await a.infer("simple", simple_arrays(), timeout=5)

    asyncio.run(main())


def test_argument_types(client: Client) -> None:
    """An int version works everywhere; wrong types say what to pass."""
    x = np.arange(8, dtype=np.int32).reshape(2, 4)
    np.testing.assert_array_equal(
        client.infer("versioned", {"INPUT0": x}, version=3)["OUTPUT0"], x + 3
    )
    assert client.is_ready("versioned", 3) and not client.is_ready("versioned", 1)
    assert client.metadata("versioned", 3).name == "versioned"
    assert client.config("versioned", version=3).name == "versioned"
    assert client.statistics("versioned", 3)[0].version == "3"
    with client.stream("versioned", version=3) as stream:
        stream.send({"INPUT0": x})
        np.testing.assert_array_equal(stream.receive()["OUTPUT0"], x + 3)

    arrays = simple_arrays()
    with pytest.raises(TypeError, match=r"inputs must map each input's name to its array.*list"):
        client.infer("simple", list(arrays.values()))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r'version must be an int or a str, e\.g\. 1 or "1"'):
        client.infer("simple", arrays, version=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="version must be"):
        client.is_ready("simple", True)
    with pytest.raises(TypeError, match=r"model must be the model's name \(a str\), not dict"):
        client.infer(arrays, "simple")  # type: ignore[arg-type]
    floats = {"INPUT0": np.ones((1, 16)), "INPUT1": arrays["INPUT1"]}
    with pytest.raises(TypeError, match="input 'INPUT0': cannot send a float64 array as INT32"):
        client.infer("simple", floats, datatypes={"INPUT0": "INT32"})


def test_async_client_in_a_second_event_loop(server: ServerProcess) -> None:
    """One AsyncClient used by two asyncio.run calls: a new channel for the new loop."""
    client = AsyncClient(server.url, timeout=30)
    assert asyncio.run(client.is_live())
    assert asyncio.run(client.is_ready("simple"))
    out = asyncio.run(client.infer("simple", simple_arrays()))
    np.testing.assert_array_equal(out["OUTPUT0"], simple_arrays()["INPUT0"] + 3)
    asyncio.run(client.close())


# Streaming


def test_stream(client: Client) -> None:
    inputs = simple_arrays()
    bad = {"INPUT0": np.zeros((1, 16), np.float32), "INPUT1": inputs["INPUT1"]}
    with client.stream("simple") as stream:
        first_id = stream.send(inputs)
        first = next(iter(stream))
        assert first.ok and first.id == first_id
        np.testing.assert_array_equal(first["OUTPUT0"], inputs["INPUT0"] + inputs["INPUT1"])

        # A failed request is reported in-band; the stream stays usable.
        bad_id = stream.send(bad, request_id="bad")
        failed = stream.receive()
        assert bad_id == "bad" and not failed.ok
        assert isinstance(failed.error, InferenceError)
        assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(InferenceError):
            failed.result()

        sent = [stream.send(simple_arrays(rows=2), outputs=["OUTPUT0"]) for _ in range(5)]
        stream.close()
        rest = list(stream)
        assert sorted(r.id for r in rest) == sorted(sent)
        assert all(r.ok and list(r.outputs) == ["OUTPUT0"] for r in rest)


def test_async_client(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(server.url, timeout=30) as c:
            assert await c.is_live()
            assert await c.is_ready("simple")
            assert (await c.metadata("simple")).name == "simple"
            assert (await c.config("simple")).max_batch_size == 8
            assert (await c.server_metadata()).name
            assert any(m.name == "simple" for m in await c.models())
            inputs = simple_arrays()
            results = await asyncio.gather(*(c.infer("simple", inputs) for _ in range(20)))
            for out in results:
                np.testing.assert_array_equal(out["OUTPUT0"], inputs["INPUT0"] + inputs["INPUT1"])
            assert (await c.statistics("simple"))[0].inference_count >= 20
            with pytest.raises(ModelNotFoundError):
                await c.infer("no_such_model", inputs)

            async with c.stream("simple") as stream:
                ids = [await stream.send(inputs) for _ in range(3)]
                await stream.send({"INPUT0": inputs["INPUT0"].astype(np.float32)}, request_id="bad")
                await stream.close()
                responses = [r async for r in stream]
            assert sorted(r.id for r in responses if r.ok) == sorted(ids)
            assert [r.id for r in responses if not r.ok] == ["bad"]

    asyncio.run(main())


# Resilience


def test_retries_ride_out_a_restart(start_server: StartServer, small_repository: Path) -> None:
    first = start_server(small_repository)
    port = first.grpc_port
    policy = RetryPolicy(max_retries=10_000, initial_backoff=0.05, max_backoff=0.25, infer=True)
    inputs = simple_arrays()
    restarted = threading.Event()
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            time.sleep(0.3)
            first.stop()
            time.sleep(0.5)
            start_server(small_repository, grpc_port=port)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            restarted.set()

    with Client(first.url, timeout=60, retries=policy) as c:
        assert c.is_ready("simple")
        thread = threading.Thread(target=restart)
        thread.start()
        longest = 0.0
        after = 0
        # Keep inferring through the outage: every call must succeed.
        while after < 5:
            started = time.monotonic()
            out = c.infer("simple", inputs)
            longest = max(longest, time.monotonic() - started)
            np.testing.assert_array_equal(out["OUTPUT0"], inputs["INPUT0"] + inputs["INPUT1"])
            if restarted.is_set():
                after += 1
            time.sleep(0.02)
        thread.join()
        assert not errors, errors
        # Some call waited out the outage (>= 0.5 s) by retrying, within its deadline.
        assert 0.3 < longest < 60
        # Idempotent calls retry by default.
        assert c.metadata("simple").name == "simple"


def test_retries_stay_within_the_deadline(
    start_server: StartServer, small_repository: Path
) -> None:
    srv = start_server(small_repository)
    url = srv.url
    srv.stop()
    with Client(url, retries=1_000) as c:
        started = time.monotonic()
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            c.infer("simple", simple_arrays(), timeout=1.0)
        assert time.monotonic() - started < 3.0
    with Client(url) as c, pytest.raises(UnavailableError):
        # infer is not retried unless enabled: fails fast.
        c.infer("simple", simple_arrays(), timeout=5.0)

    async def async_twin() -> None:
        async with AsyncClient(url, retries=1_000) as ac:
            with pytest.raises((UnavailableError, DeadlineExceededError)):
                await ac.metadata("simple", timeout=1.0)

    started = time.monotonic()
    asyncio.run(async_twin())
    assert time.monotonic() - started < 3.0


def test_round_robin_across_replicas(start_server: StartServer, small_repository: Path) -> None:
    replicas = [start_server(small_repository), start_server(small_repository)]
    with Client([r.url for r in replicas], timeout=30) as c:
        for _ in range(40):
            c.infer("simple", simple_arrays())
    counts = []
    for replica in replicas:
        with Client(replica.url) as one:
            counts.append(one.statistics("simple")[0].inference_count)
    assert sum(counts) == 40
    assert all(n > 0 for n in counts), counts


def test_each_client_has_its_own_connection(server: ServerProcess) -> None:
    """gRPC would give every channel of a process one shared connection; ours do not."""
    before = client_ports(server.grpc_port)
    with Client(server.url, timeout=30) as first, Client(server.url, timeout=30) as second:
        first.infer("simple", simple_arrays())
        second.infer("simple", simple_arrays())
        assert len(client_ports(server.grpc_port) - before) == 2


def test_connections_take_calls_in_turn(server: ServerProcess) -> None:
    before = client_ports(server.grpc_port)
    arrays = simple_arrays()
    with Client(server.url, timeout=30, connections=3) as client:
        for _ in range(6):
            out = client.infer("simple", arrays)
            np.testing.assert_array_equal(out["OUTPUT0"], arrays["INPUT0"] + arrays["INPUT1"])
        assert len(client_ports(server.grpc_port) - before) == 3
        with client.stream("simple") as stream:  # a stream stays on one connection
            for _ in range(3):
                stream.send(arrays)
            stream.close()
            responses = list(stream)
        assert len(responses) == 3 and all(response.ok for response in responses)

    async def main() -> int:
        async with AsyncClient(server.url, timeout=30, connections=4) as aclient:
            await asyncio.gather(*(aclient.infer("simple", arrays) for _ in range(8)))
            return len(client_ports(server.grpc_port) - before)

    assert asyncio.run(main()) == 4
    with pytest.raises(ValueError, match="connections"):
        Client(server.url, connections=0)


def test_connections_reach_every_front_end(
    start_server: StartServer, small_repository: Path
) -> None:
    """With --frontends 2, one client with several connections is served by both."""
    server = start_server(small_repository, "--frontends", "2")
    deadline = time.monotonic() + 30
    while len(front_ends := _front_ends(server)) < 2:  # one may still be starting
        assert time.monotonic() < deadline, front_ends
        time.sleep(0.1)
    # The kernel hashes each connection to one front end: 8 connections all on
    # one of two is a 1-in-128 draw, so a few clients settle it.
    for _ in range(4):
        with Client(server.url, timeout=30, connections=8) as client:
            for _ in range(8):
                client.infer("simple", simple_arrays())
            counts = connection_counts(server.grpc_port, front_ends)
        assert sum(counts) == 8, counts
        if all(counts):
            break
    assert all(counts), counts


def _front_ends(server: ServerProcess) -> list[int]:
    found = []
    for pid in process_tree(server.process.pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().startswith("lockgate: front"):
                found.append(pid)
    return found


def test_dns_target(server: ServerProcess) -> None:
    with Client(f"dns:///localhost:{server.grpc_port}", timeout=30) as c:
        assert c.infer("simple", simple_arrays())["OUTPUT0"].shape == (1, 16)


def test_compression_and_metadata(server: ServerProcess) -> None:
    with Client(server.url, compression="gzip", metadata={"X-Team": "sdk"}, timeout=30) as c:
        out = c.infer("identity_fp32", {"INPUT0": np.zeros((2, 50_000), np.float32)})
        assert out["OUTPUT0"].shape == (2, 50_000)
    with pytest.raises(ValueError):
        Client(server.url, compression="brotli")


def test_trace_context_is_injected(server: ServerProcess) -> None:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")

    assert trace_metadata() == ()  # no active span
    tracer = sdk_trace.TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("caller"):
        pairs = dict(trace_metadata())
        assert pairs["traceparent"].startswith("00-")
        with Client(server.url, timeout=30) as c:
            c.infer("simple", simple_arrays())


def test_sdk_shares_a_process_with_tritonclient(server: ServerProcess) -> None:
    code = (
        "import tritonclient.grpc as tc, numpy as np, lockgate_client as lc\n"
        f"url = {server.url!r}\n"
        "a = np.ones((1, 16), np.int32)\n"
        "t = tc.InferenceServerClient(url)\n"
        "i0 = tc.InferInput('INPUT0', [1, 16], 'INT32'); i0.set_data_from_numpy(a)\n"
        "i1 = tc.InferInput('INPUT1', [1, 16], 'INT32'); i1.set_data_from_numpy(a)\n"
        "assert t.infer('simple', [i0, i1]).as_numpy('OUTPUT0').tolist() == [[2] * 16]\n"
        "with lc.Client(url) as c:\n"
        "    out = c.infer('simple', {'INPUT0': a, 'INPUT1': a})\n"
        "    assert out['OUTPUT0'].tolist() == [[2] * 16]\n"
    )
    for first in ("tritonclient.grpc", "lockgate_client"):
        result = subprocess.run(
            [sys.executable, "-c", f"import {first}\n" + code],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


# Security: TLS, mTLS, bearer tokens


def start_unwaited(start_server: StartServer, repo: Path, *flags: str) -> ServerProcess:
    """Start a server the conftest's plaintext health check cannot probe."""
    srv = start_server(repo, *flags, wait=False)
    time.sleep(0.2)
    if srv.process.poll() is not None and "unrecognized arguments" in srv.log():
        pytest.skip(f"this server does not take {flags[0]}: {srv.log().strip()[-200:]}")
    return srv


def wait_for(srv: ServerProcess, **client_options: Any) -> None:
    deadline = time.monotonic() + 60
    with Client(srv.url, **client_options) as c:
        while time.monotonic() < deadline:
            if srv.process.poll() is not None:
                log = srv.log()
                if "unrecognized arguments" in log:
                    pytest.skip(f"this server does not take the flags: {log.strip()[-200:]}")
                pytest.fail(f"server exited:\n{log}")
            try:
                if c.is_ready("simple", timeout=2):
                    return
            except LockgateError:
                time.sleep(0.2)
    pytest.fail(f"server not ready:\n{srv.log()}")


def test_tls(start_server: StartServer, small_repository: Path, certificates: Path) -> None:
    srv = start_unwaited(
        start_server,
        small_repository,
        "--tls-cert",
        str(certificates / "server.pem"),
        "--tls-key",
        str(certificates / "server.key"),
    )
    wait_for(srv, tls=certificates / "ca.pem")
    ca = (certificates / "ca.pem").read_bytes()
    with Client(srv.url, tls=ca, timeout=10) as c:
        assert c.infer("simple", simple_arrays())["OUTPUT0"].shape == (1, 16)
    with Client(f"localhost:{srv.grpc_port}", tls=str(certificates / "ca.pem"), timeout=10) as c:
        assert c.is_ready("simple")
    with Client(srv.url, timeout=5, retries=0) as plain, pytest.raises(UnavailableError):
        plain.server_metadata()
    # The system's roots do not trust our test CA.
    with (
        Client(srv.url, tls=True, timeout=5, retries=0) as untrusted,
        pytest.raises(UnavailableError),
    ):
        untrusted.server_metadata()


def test_mtls(start_server: StartServer, small_repository: Path, certificates: Path) -> None:
    srv = start_unwaited(
        start_server,
        small_repository,
        "--tls-cert",
        str(certificates / "server.pem"),
        "--tls-key",
        str(certificates / "server.key"),
        "--tls-client-ca",
        str(certificates / "ca.pem"),
    )
    mutual: dict[str, Any] = {
        "tls": certificates / "ca.pem",
        "client_cert": certificates / "client.pem",
        "client_key": certificates / "client.key",
    }
    wait_for(srv, **mutual)
    with Client(srv.url, timeout=10, **mutual) as c:
        assert c.infer("simple", simple_arrays())["OUTPUT0"].shape == (1, 16)
    anonymous = Client(srv.url, tls=certificates / "ca.pem", timeout=5, retries=0)
    with anonymous, pytest.raises(UnavailableError):
        anonymous.server_metadata()
    with pytest.raises(ValueError):
        Client(srv.url, tls=certificates / "ca.pem", client_cert=certificates / "client.pem")


def test_bearer_token(start_server: StartServer, small_repository: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("infer-token infer\nadmin-token control\n")
    srv = start_unwaited(start_server, small_repository, "--auth-token-file", str(tokens))
    wait_for(srv, token="admin-token")
    with Client(srv.url, timeout=10) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous.infer("simple", simple_arrays())
    with Client(srv.url, token="wrong", timeout=10) as wrong, pytest.raises(UnauthenticatedError):
        wrong.metadata("simple")
    with Client(srv.url, token="infer-token", timeout=10) as user:
        assert user.infer("simple", simple_arrays())["OUTPUT0"].shape == (1, 16)
        with pytest.raises(PermissionDeniedError):
            user.unload("simple")


# Repository control


def test_load_and_unload(start_server: StartServer, small_repository: Path) -> None:
    srv = start_server(small_repository, "--model-control-mode", "explicit")
    with Client(srv.url, timeout=60) as c:
        c.load("simple")
        assert c.is_ready("simple")
        config = c.config("simple")
        c.unload("simple")
        with pytest.raises(LockgateError):
            c.infer("simple", simple_arrays())
        states = {m.name: m.state for m in c.models()}
        assert states["simple"] != "READY"
        # Reload with a configuration override (sent as JSON).
        config.max_batch_size = 4
        c.load("simple", config=config)
        assert c.config("simple").max_batch_size == 4
        assert c.infer("simple", simple_arrays())["OUTPUT0"].shape == (1, 16)
        # A dict travels as JSON too.
        c.load("simple", config={"max_batch_size": 2, "dynamic_batching": {}})
        assert c.config("simple").max_batch_size == 2
        assert c.infer("simple", simple_arrays(rows=2))["OUTPUT0"].shape == (2, 16)
        with pytest.raises(ModelNotFoundError):
            c.load("no_such_model")


# The CLI subcommands (lockgate infer|models|stats|bench)


def run_cli(*argv: str) -> int:
    from lockgate_client.cli import main

    return main(argv)


def test_cli_infer(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "a.npy", np.arange(16, dtype=np.int32).reshape(1, 16))
    ones = json.dumps([1] * 16)  # no batch dimension: the CLI adds it
    code = run_cli(
        *("infer", "simple", "--url", server.url),
        *("--input", f"INPUT0={tmp_path / 'a.npy'}", "--input", f"INPUT1={ones}"),
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "OUTPUT0" in out and "INT32" in out and "[1, 16]" in out
    assert "16" in out

    assert run_cli("infer", "no_such_model", "--url", server.url, "--input", "X=[1]") != 0
    assert "NOT_FOUND" in capsys.readouterr().err


def test_cli_infer_fits_values_to_the_model(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """np.save's float64 ones go to INT32 inputs; leading dims of 1 are added too."""
    np.save(tmp_path / "ones.npy", np.ones((1, 16)))  # float64, as np.save writes by default
    code = run_cli(
        *("infer", "simple", "--url", server.url),
        *("--input", f"INPUT0={json.dumps(list(range(16)))}"),
        *("--input", f"INPUT1={tmp_path / 'ones.npy'}"),
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[[ 1  2  3" in out

    np.save(tmp_path / "halves.npy", np.full((1, 16), 0.5))
    code = run_cli(
        *("infer", "simple", "--url", server.url),
        *("--input", f"INPUT0={tmp_path / 'halves.npy'}", "--input", f"INPUT1={[1] * 16}"),
    )
    assert code != 0
    assert "--input INPUT0: INT32 needs whole numbers" in capsys.readouterr().err

    # nobatch: dims [2, 3] and no batch dimension: values must have that shape.
    code = run_cli("infer", "nobatch", "--url", server.url, "--input", "INPUT0=[[1,2,3],[4,5,6]]")
    assert code == 0
    assert "[[ 2.  4.  6.]" in capsys.readouterr().out


def test_cli_infer_adds_leading_ones(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain 4-element list for a model whose input dims are [1, 4]."""
    repo = tmp_path / "repo"
    row = [Tensor("INPUT0", "TYPE_INT32", (1, 4))]
    out = [Tensor("OUTPUT0", "TYPE_INT32", (1, 4))]
    nodes = [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])]
    write_single(repo, "row", nodes, row, out, max_batch_size=0, dynamic_batching=None)
    server = start_server(repo)
    code = run_cli("infer", "row", "--url", server.url, "--input", "INPUT0=[1,2,3,4]")
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "OUTPUT0  INT32  [1, 4]" in printed.out


def test_cli_models_and_stats(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("models", "--url", server.url) == 0
    out = capsys.readouterr().out
    assert "simple" in out and "READY" in out and "broken" in out
    with Client(server.url) as c:
        c.infer("simple", simple_arrays())
    assert run_cli("stats", "simple", "--url", server.url) == 0
    out = capsys.readouterr().out
    assert "simple" in out and "queue" in out.lower()


def test_cli_bench(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(
        *("bench", "simple", "--url", server.url, "--concurrency", "1,4"),
        *("--duration", "1", "--warmup", "0", "--json"),
    )
    captured = capsys.readouterr()
    assert code == 0
    results = json.loads(captured.out)
    assert [r["concurrency"] for r in results["results"]] == [1, 4]
    for r in results["results"]:
        assert r["requests"] > 0 and r["errors"] == 0
        assert r["throughput"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert "req/s" in captured.err

    # Other datatypes and batch sizes; the plain table.
    for model in ("simple_string", "identity_bf16", "nobatch"):
        argv = ["bench", model, "--url", server.url, "--concurrency", "2", "--batch", "2"]
        assert run_cli(*argv, "--duration", "0.5", "--warmup", "0") == 0
        assert "P99 MS" in capsys.readouterr().out
