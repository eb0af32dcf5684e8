"""Triton's system shared-memory extension, against real servers.

Clients create POSIX shared-memory regions with tritonclient's own
``tritonclient.utils.shared_memory`` (as NVIDIA's shm examples do), register
them, and run ``simple`` and ``simple_string`` with inputs and outputs in the
regions. Every bad name, key, offset and size gets a clear status and the
server keeps serving; regions are unmapped on unregister (checked in the
server's /proc/PID/maps); the server never unlinks a client's key; no test
leaves anything in /dev/shm.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ServerProcess, simple_arrays
from tritonclient.utils import (
    InferenceServerException,
    serialize_byte_tensor,
    serialized_byte_size,
)

from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as svc
from lockgate_client.datatypes import WIRE_DTYPES

Array = npt.NDArray[Any]
PREFIX = f"lockgate_test_{os.getpid()}_"
_counter = itertools.count()


def _leftovers() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(PREFIX))


class Regions:
    """Creates client regions with tritonclient's shm utilities; destroys them after."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def create(self, byte_size: int, name: str | None = None) -> tuple[str, str, Any]:
        """(region name, key, handle) of a new region of ``byte_size`` bytes."""
        number = next(_counter)
        key = f"/{PREFIX}{number}"
        name = name or f"region_{os.getpid()}_{number}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        self.handles.append(handle)
        return name, key, handle

    def destroy_all(self) -> None:
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)
        self.handles.clear()


@pytest.fixture
def regions() -> Iterator[Regions]:
    made = Regions()
    yield made
    made.destroy_all()
    assert _leftovers() == []


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode | None, str]:
    try:
        call()
    except InferenceServerException as exc:
        status = exc.status() or ""
        return getattr(grpc.StatusCode, status.removeprefix("StatusCode."), None), str(
            exc.message()
        )
    return None, ""


def _simple_inputs() -> tuple[Array, Array]:
    arrays = simple_arrays()
    return arrays["INPUT0"], arrays["INPUT1"]


def _still_serves(triton: tc.InferenceServerClient) -> None:
    a, b = _simple_inputs()
    inputs = [tc.InferInput("INPUT0", [1, 16], "INT32"), tc.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = triton.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def _mapped(server: ServerProcess, key: str) -> bool:
    """Whether any of the server's processes has ``key`` mapped (Linux: /proc/PID/maps)."""
    return bool(_family_maps(server, key))


# --- what NVIDIA's simple_grpc_shm_client.py does ---------------------------------------


@pytest.mark.frontends(1, 2)
def test_simple_inputs_and_outputs_in_shared_memory(
    client: tc.InferenceServerClient, server: ServerProcess, regions: Regions
) -> None:
    a, b = _simple_inputs()
    in_name, in_key, in_handle = regions.create(128)
    out_name, out_key, out_handle = regions.create(128)
    shm.set_shared_memory_region(in_handle, [a])
    shm.set_shared_memory_region(in_handle, [b], offset=64)
    client.register_system_shared_memory(in_name, in_key, 128)
    client.register_system_shared_memory(out_name, out_key, 128)
    try:
        inputs = [
            tc.InferInput("INPUT0", [1, 16], "INT32"),
            tc.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_shared_memory(in_name, 64)
        inputs[1].set_shared_memory(in_name, 64, offset=64)
        outputs = [tc.InferRequestedOutput("OUTPUT0"), tc.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory(out_name, 64)
        outputs[1].set_shared_memory(out_name, 64, offset=64)
        result = client.infer("simple", inputs, outputs=outputs)
        response = result.get_response()
        # Shape and datatype travel; the bytes do not.
        assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
        assert all(list(o.shape) == [1, 16] and o.datatype == "INT32" for o in response.outputs)
        assert all(raw == b"" for raw in response.raw_output_contents)
        output0 = result.get_output("OUTPUT0")
        sums = shm.get_contents_as_numpy(out_handle, np.int32, output0.shape)
        differences = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=64)
        np.testing.assert_array_equal(sums, a + b)
        np.testing.assert_array_equal(differences, a - b)
        status = client.get_system_shared_memory_status()
        assert {in_name, out_name} <= set(status.regions)
        region = client.get_system_shared_memory_status(in_name).regions[in_name]
        assert (region.name, region.key, region.offset, region.byte_size) == (
            in_name,
            in_key,
            0,
            128,
        )
        assert _mapped(server, in_key)
    finally:
        client.unregister_system_shared_memory(in_name)
        client.unregister_system_shared_memory(out_name)
    assert in_name not in client.get_system_shared_memory_status().regions
    # Unregistering unmaps (in every process: front ends learn of it from the
    # engine's next snapshot), and never unlinks: the key is the client's.
    _until(lambda: not _mapped(server, in_key) and not _mapped(server, out_key), "unmapped")
    assert os.path.exists(f"/dev/shm{in_key}")


@pytest.mark.frontends(1, 2)
def test_string_inputs_and_outputs_in_shared_memory(
    client: tc.InferenceServerClient, regions: Regions
) -> None:
    """What simple_grpc_shm_string_client.py does: BYTES in Triton's serialized form."""
    a = np.array([str(i) for i in range(16)], dtype=np.object_).reshape(1, 16)
    b = np.array(["1"] * 16, dtype=np.object_).reshape(1, 16)
    a_bytes, b_bytes = serialize_byte_tensor(a), serialize_byte_tensor(b)
    a_size, b_size = serialized_byte_size(a_bytes), serialized_byte_size(b_bytes)
    in_name, in_key, in_handle = regions.create(a_size + b_size)
    out_name, out_key, out_handle = regions.create(1024)
    shm.set_shared_memory_region(in_handle, [a_bytes])
    shm.set_shared_memory_region(in_handle, [b_bytes], offset=a_size)
    client.register_system_shared_memory(in_name, in_key, a_size + b_size)
    client.register_system_shared_memory(out_name, out_key, 1024)
    try:
        inputs = [
            tc.InferInput("INPUT0", [1, 16], "BYTES"),
            tc.InferInput("INPUT1", [1, 16], "BYTES"),
        ]
        inputs[0].set_shared_memory(in_name, a_size)
        inputs[1].set_shared_memory(in_name, b_size, offset=a_size)
        outputs = [tc.InferRequestedOutput("OUTPUT0"), tc.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory(out_name, 512)
        outputs[1].set_shared_memory(out_name, 512, offset=512)
        result = client.infer("simple_string", inputs, outputs=outputs)
        shape = result.get_output("OUTPUT0").shape
        sums = shm.get_contents_as_numpy(out_handle, np.object_, shape)
        differences = shm.get_contents_as_numpy(out_handle, np.object_, shape, offset=512)
        assert [int(x) for x in sums.reshape(-1)] == [i + 1 for i in range(16)]
        assert [int(x) for x in differences.reshape(-1)] == [i - 1 for i in range(16)]
    finally:
        client.unregister_system_shared_memory(in_name)
        client.unregister_system_shared_memory(out_name)


@pytest.mark.frontends(1, 2)
def test_mixed_inline_and_shared_memory_tensors(
    client: tc.InferenceServerClient, regions: Regions
) -> None:
    """One input and one output in a region, the others inline: entries stay aligned."""
    a, b = _simple_inputs()
    name, key, handle = regions.create(4096)
    shm.set_shared_memory_region(handle, [b], offset=100)  # offset: no multiple of 4 or a page
    client.register_system_shared_memory(name, key, 4000, offset=13)
    try:
        inputs = [
            tc.InferInput("INPUT0", [1, 16], "INT32"),
            tc.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_shared_memory(name, 64, offset=87)  # 13 + 87 = 100
        outputs = [tc.InferRequestedOutput("OUTPUT0"), tc.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory(name, 64, offset=1000)
        result = client.infer("simple", inputs, outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        sums = shm.get_contents_as_numpy(handle, np.int32, [1, 16], offset=1013)
        np.testing.assert_array_equal(sums, a + b)
    finally:
        client.unregister_system_shared_memory(name)


@pytest.mark.frontends(1, 2)
def test_batcher_merges_shared_memory_and_inline_requests(
    client: tc.InferenceServerClient, server: ServerProcess, regions: Regions
) -> None:
    """Concurrent requests to a batching model, half from a region, all answered right."""
    rows = 8
    name, key, handle = regions.create(rows * 2 * 64 + rows * 64)
    values = [np.full((1, 16), i, dtype=np.int32) for i in range(rows)]
    for i, value in enumerate(values):
        shm.set_shared_memory_region(handle, [value, value], offset=i * 128)
    client.register_system_shared_memory(name, key, rows * 3 * 64)
    answers: dict[int, Array] = {}

    def call(i: int) -> None:
        with tc.InferenceServerClient(server.url) as own:
            inputs = [
                tc.InferInput("INPUT0", [1, 16], "INT32"),
                tc.InferInput("INPUT1", [1, 16], "INT32"),
            ]
            outputs = [tc.InferRequestedOutput("OUTPUT0")]
            if i % 2:
                inputs[0].set_shared_memory(name, 64, offset=i * 128)
                inputs[1].set_shared_memory(name, 64, offset=i * 128 + 64)
                outputs[0].set_shared_memory(name, 64, offset=rows * 128 + i * 64)
                own.infer("simple", inputs, outputs=outputs)
                answers[i] = shm.get_contents_as_numpy(
                    handle, np.int32, [1, 16], offset=rows * 128 + i * 64
                )
            else:
                inputs[0].set_data_from_numpy(values[i])
                inputs[1].set_data_from_numpy(values[i])
                answers[i] = own.infer("simple", inputs, outputs=outputs).as_numpy("OUTPUT0")

    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(rows)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        client.unregister_system_shared_memory(name)
    for i in range(rows):
        np.testing.assert_array_equal(answers[i], values[i] * 2)


# --- status semantics --------------------------------------------------------------------


def test_register_status_unregister_semantics(
    client: tc.InferenceServerClient, regions: Regions
) -> None:
    name, key, _ = regions.create(64)
    client.register_system_shared_memory(name, key, 64)
    try:
        code, message = _code(lambda: client.register_system_shared_memory(name, key, 64))
        assert code == grpc.StatusCode.ALREADY_EXISTS and name in message
        code, message = _code(lambda: client.get_system_shared_memory_status("no_such_region"))
        assert code == grpc.StatusCode.NOT_FOUND and "no_such_region" in message
    finally:
        client.unregister_system_shared_memory(name)
    # Unregistering an unknown (or already unregistered) name is no error, as in Triton.
    client.unregister_system_shared_memory(name)
    client.unregister_system_shared_memory("never_registered")
    extensions = client.get_server_metadata().extensions
    assert "system_shared_memory" in extensions and "cuda_shared_memory" not in extensions


def test_cuda_shared_memory_is_unimplemented(client: tc.InferenceServerClient) -> None:
    for call in (
        lambda: client.get_cuda_shared_memory_status(),
        lambda: client.register_cuda_shared_memory("r", b"", 0, 64),
    ):
        code, message = _code(call)
        assert code == grpc.StatusCode.UNIMPLEMENTED and "CUDA shared memory" in message
    # Unregistering holds nothing to undo, and succeeds as Triton's does for
    # names it does not hold: perf_analyzer unregisters both kinds at exit.
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("never")


# --- bad registrations -------------------------------------------------------------------


def _register(url: str, name: str, key: str, offset: int, byte_size: int) -> None:
    with grpc.insecure_channel(url) as channel:
        svc.GRPCInferenceServiceStub(channel).SystemSharedMemoryRegister(  # type: ignore[no-untyped-call]
            pb.SystemSharedMemoryRegisterRequest(
                name=name, key=key, offset=offset, byte_size=byte_size
            ),
            timeout=10,
        )


@pytest.mark.parametrize(
    ("case", "key", "offset", "byte_size", "words"),
    [
        ("missing key", "/lockgate_no_such_key", 0, 64, ["does not exist"]),
        ("empty key", "", 0, 64, ["empty"]),
        ("path key", "/../etc/passwd", 0, 64, ["not a POSIX shared memory name"]),
        ("dir key", "/dir/file", 0, 64, ["not a POSIX shared memory name"]),
        ("dot key", "/..", 0, 64, ["not a POSIX shared memory name"]),
        ("long key", "/" + "k" * 300, 0, 64, ["255"]),
        ("past the end", None, 0, 65, ["exceeds", "64 bytes"]),
        ("offset past the end", None, 64, 1, ["exceeds"]),
        ("offset + size overflow", None, 2**64 - 1, 2**64 - 1, ["exceeds"]),
        ("zero size", None, 0, 0, ["byte_size 0"]),
        ("empty name", None, 0, 64, ["name is empty"]),
    ],
)
def test_bad_registration_is_invalid_argument(
    client: tc.InferenceServerClient,
    server: ServerProcess,
    regions: Regions,
    case: str,
    key: str | None,
    offset: int,
    byte_size: int,
    words: list[str],
) -> None:
    name, real_key, _ = regions.create(64)
    if case == "empty name":
        name = ""
    with pytest.raises(grpc.RpcError) as caught:
        _register(server.url, name, real_key if key is None else key, offset, byte_size)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    for word in words:
        assert word in (caught.value.details() or "")
    assert name not in client.get_system_shared_memory_status().regions
    _still_serves(client)


def test_key_that_is_no_shared_memory_object(
    client: tc.InferenceServerClient, server: ServerProcess
) -> None:
    """A symlink in /dev/shm is not followed; a directory is not mapped."""
    link = f"/dev/shm/{PREFIX}link"
    directory = f"/dev/shm/{PREFIX}dir"
    os.symlink("/etc/hostname", link)
    os.mkdir(directory)
    try:
        for key in (f"/{PREFIX}link", f"/{PREFIX}dir"):
            with pytest.raises(grpc.RpcError) as caught:
                _register(server.url, "odd", key, 0, 8)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        os.unlink(link)
        os.rmdir(directory)
    _still_serves(client)


# --- bad references in inference requests --------------------------------------------------


def _infer_with(
    url: str,
    input_params: dict[str, Any] | None,
    output_params: dict[str, Any] | None = None,
    inline_input1: bool = True,
) -> tuple[grpc.StatusCode, str]:
    """ModelInfer on ``simple`` with INPUT0 described by ``input_params``."""
    a, b = _simple_inputs()
    request = pb.ModelInferRequest(model_name="simple")
    first = request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    second = request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    del second
    raws = []
    if input_params is None:
        raws.append(a.tobytes())
    else:
        for key, value in input_params.items():
            _set(first.parameters[key], value)
    raws.append(b.tobytes())
    request.raw_input_contents.extend(raws)
    if output_params is not None:
        output = request.outputs.add(name="OUTPUT0")
        for key, value in output_params.items():
            _set(output.parameters[key], value)
    with grpc.insecure_channel(url) as channel:
        stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _set(parameter: pb.InferParameter, value: Any) -> None:
    if isinstance(value, str):
        parameter.string_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    elif isinstance(value, bool):
        parameter.bool_param = value
    else:
        parameter.int64_param = value


REGION = "__region__"


@pytest.mark.parametrize(
    ("input_params", "output_params", "code", "words"),
    [
        ({"shared_memory_region": "unknown", "shared_memory_byte_size": 64}, None,
         grpc.StatusCode.NOT_FOUND, ["input 'INPUT0'", "'unknown'", "not registered"]),
        ({"shared_memory_region": REGION, "shared_memory_byte_size": 60}, None,
         grpc.StatusCode.INVALID_ARGUMENT, ["input 'INPUT0'", "expected 64"]),
        ({"shared_memory_region": REGION, "shared_memory_byte_size": 68}, None,
         grpc.StatusCode.INVALID_ARGUMENT, ["input 'INPUT0'", "expected 64"]),
        ({"shared_memory_region": REGION, "shared_memory_byte_size": 64,
          "shared_memory_offset": 200}, None,
         grpc.StatusCode.INVALID_ARGUMENT, ["input 'INPUT0'", "past the end"]),
        ({"shared_memory_region": REGION, "shared_memory_byte_size": 2**62,
          "shared_memory_offset": 2**62}, None,
         grpc.StatusCode.INVALID_ARGUMENT, ["input 'INPUT0'", "past the end"]),
        ({"shared_memory_region": REGION, "shared_memory_byte_size": 64,
          "shared_memory_offset": -1}, None,
         grpc.StatusCode.INVALID_ARGUMENT, ["input 'INPUT0'", "negative"]),
        ({"shared_memory_region": REGION}, None,
         grpc.StatusCode.INVALID_ARGUMENT, ["input 'INPUT0'", "shared_memory_byte_size"]),
        ({"shared_memory_region": REGION, "shared_memory_byte_size": "64"}, None,
         grpc.StatusCode.INVALID_ARGUMENT, ["input 'INPUT0'", "integer"]),
        ({"shared_memory_region": 5, "shared_memory_byte_size": 64}, None,
         grpc.StatusCode.INVALID_ARGUMENT, ["input 'INPUT0'", "string"]),
        ({"shared_memory_byte_size": 64}, None,
         grpc.StatusCode.INVALID_ARGUMENT, ["input 'INPUT0'", "no 'shared_memory_region'"]),
        (None, {"shared_memory_region": REGION, "shared_memory_byte_size": 32},
         grpc.StatusCode.INVALID_ARGUMENT, ["output 'OUTPUT0'", "at least 64 bytes"]),
        (None, {"shared_memory_region": REGION, "shared_memory_byte_size": 64,
                "shared_memory_offset": 250}, grpc.StatusCode.INVALID_ARGUMENT,
         ["output 'OUTPUT0'", "past the end"]),
        (None, {"shared_memory_region": "gone", "shared_memory_byte_size": 64},
         grpc.StatusCode.NOT_FOUND, ["output 'OUTPUT0'", "'gone'"]),
    ],
)  # fmt: skip
@pytest.mark.frontends(1, 2)
def test_bad_shared_memory_reference(
    client: tc.InferenceServerClient,
    server: ServerProcess,
    regions: Regions,
    input_params: dict[str, Any] | None,
    output_params: dict[str, Any] | None,
    code: grpc.StatusCode,
    words: list[str],
) -> None:
    name, key, handle = regions.create(256)
    shm.set_shared_memory_region(handle, [np.zeros((1, 16), np.int32)])
    client.register_system_shared_memory(name, key, 256)
    try:

        def resolve(params: dict[str, Any] | None) -> dict[str, Any] | None:
            if params is None:
                return None
            return {k: (name if v == REGION else v) for k, v in params.items()}

        got, message = _infer_with(server.url, resolve(input_params), resolve(output_params))
        assert got == code, message
        for word in words:
            assert word in message
        _still_serves(client)
    finally:
        client.unregister_system_shared_memory(name)


@pytest.mark.frontends(1, 2)
def test_region_shrunk_after_registration(
    client: tc.InferenceServerClient, server: ServerProcess, regions: Regions
) -> None:
    """A client that truncates its object gets INVALID_ARGUMENT, not a crashed server."""
    name, key, _ = regions.create(256)
    client.register_system_shared_memory(name, key, 256)
    try:
        os.truncate(f"/dev/shm{key}", 16)
        got, message = _infer_with(
            server.url, {"shared_memory_region": name, "shared_memory_byte_size": 64}
        )
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "exceeds" in message
        _still_serves(client)
    finally:
        client.unregister_system_shared_memory(name)


def test_raw_contents_count_excludes_shared_memory_inputs(
    client: tc.InferenceServerClient, server: ServerProcess, regions: Regions
) -> None:
    """A raw entry for an input that is in shared memory is one entry too many."""
    name, key, _ = regions.create(64)
    client.register_system_shared_memory(name, key, 64)
    try:
        request = pb.ModelInferRequest(model_name="simple")
        first = request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
        first.parameters["shared_memory_region"].string_param = name
        first.parameters["shared_memory_byte_size"].int64_param = 64
        request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
        request.raw_input_contents.extend([bytes(64), bytes(64)])
        with grpc.insecure_channel(server.url) as channel:
            stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not in shared memory" in (caught.value.details() or "")
    finally:
        client.unregister_system_shared_memory(name)


# --- lifetime ----------------------------------------------------------------------------


def test_unregister_under_load(
    client: tc.InferenceServerClient, server: ServerProcess, regions: Regions
) -> None:
    """Requests racing unregister/re-register either succeed exactly or get NOT_FOUND."""
    name, key, handle = regions.create(64 * 2 + 64 * 8)
    a, b = _simple_inputs()
    shm.set_shared_memory_region(handle, [a, b])
    client.register_system_shared_memory(name, key, 64 * 10)
    stop = threading.Event()
    outcomes: list[str] = []
    failures: list[str] = []

    def load(slot: int) -> None:
        with tc.InferenceServerClient(server.url) as own:
            while not stop.is_set():
                inputs = [
                    tc.InferInput("INPUT0", [1, 16], "INT32"),
                    tc.InferInput("INPUT1", [1, 16], "INT32"),
                ]
                inputs[0].set_shared_memory(name, 64)
                inputs[1].set_shared_memory(name, 64, offset=64)
                outputs = [tc.InferRequestedOutput("OUTPUT0")]
                outputs[0].set_shared_memory(name, 64, offset=128 + slot * 64)
                try:
                    own.infer("simple", inputs, outputs=outputs)
                except InferenceServerException as exc:
                    if exc.status() != "StatusCode.NOT_FOUND":
                        failures.append(f"{exc.status()}: {exc.message()}")
                    outcomes.append("not found")
                    continue
                got = shm.get_contents_as_numpy(handle, np.int32, [1, 16], offset=128 + slot * 64)
                if not np.array_equal(got, a + b):
                    failures.append(f"wrong result {got}")
                outcomes.append("ok")

    threads = [threading.Thread(target=load, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(30):
            time.sleep(0.02)
            client.unregister_system_shared_memory(name)
            time.sleep(0.01)
            client.register_system_shared_memory(name, key, 64 * 10)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        client.unregister_system_shared_memory(name)
    assert failures == []
    assert "ok" in outcomes
    assert not _mapped(server, key)
    _still_serves(client)


_DYING_CLIENT = """
import sys, os
import numpy as np
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
url, name, key = sys.argv[1:4]
handle = shm.create_shared_memory_region(name, key, 128)
shm.set_shared_memory_region(handle, [np.arange(16, dtype=np.int32), np.ones(16, np.int32)])
tc.InferenceServerClient(url).register_system_shared_memory(name, key, 128)
print("registered", flush=True)
sys.stdin.read()
"""


def test_client_that_dies_without_unregistering(
    client: tc.InferenceServerClient, server: ServerProcess
) -> None:
    """The region outlives its client until someone unregisters it; the key is never unlinked."""
    name, key = f"dying_{os.getpid()}", f"/{PREFIX}dying"
    dying = subprocess.Popen(
        [sys.executable, "-c", _DYING_CLIENT, server.url, name, key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert dying.stdout is not None
        assert dying.stdout.readline().strip() == b"registered"
        dying.send_signal(signal.SIGKILL)
        dying.wait(10)
        # The server still holds the region and serves from it.
        assert name in client.get_system_shared_memory_status().regions
        got, message = _infer_with(
            server.url, {"shared_memory_region": name, "shared_memory_byte_size": 64}
        )
        assert got == grpc.StatusCode.OK, message
        _still_serves(client)
        client.unregister_system_shared_memory(name)
        assert not _mapped(server, key)
        assert os.path.exists(f"/dev/shm{key}")  # the client's to unlink, not ours
    finally:
        if dying.poll() is None:
            dying.kill()
            dying.wait()
        client.unregister_system_shared_memory(name)
        if os.path.exists(f"/dev/shm{key}"):
            os.unlink(f"/dev/shm{key}")


def test_unregister_all_and_shutdown(
    start_server: Callable[..., ServerProcess], model_repository: Path, regions: Regions
) -> None:
    """Empty name unregisters every region; shutdown unmaps and unlinks nothing."""
    server = start_server(model_repository)
    with tc.InferenceServerClient(server.url) as triton:
        made = [regions.create(64) for _ in range(3)]
        for name, key, _ in made:
            triton.register_system_shared_memory(name, key, 64)
        assert set(triton.get_system_shared_memory_status().regions) == {m[0] for m in made}
        triton.unregister_system_shared_memory()
        assert len(triton.get_system_shared_memory_status().regions) == 0
        assert not any(_mapped(server, key) for _, key, _ in made)
        for name, key, _ in made:
            triton.register_system_shared_memory(name, key, 64)
    assert server.stop() == 0
    assert all(os.path.exists(f"/dev/shm{key}") for _, key, _ in made)


def test_shared_memory_off(
    start_server: Callable[..., ServerProcess], model_repository: Path, regions: Regions
) -> None:
    server = start_server(model_repository, "--shared-memory", "off")
    with tc.InferenceServerClient(server.url) as triton:
        name, key, _ = regions.create(64)
        for call in (
            lambda: triton.register_system_shared_memory(name, key, 64),
            lambda: triton.get_system_shared_memory_status(),
            lambda: triton.unregister_system_shared_memory(),
        ):
            code, message = _code(call)
            assert code == grpc.StatusCode.UNIMPLEMENTED and "--shared-memory" in message
        got, message = _infer_with(
            server.url, {"shared_memory_region": name, "shared_memory_byte_size": 64}
        )
        assert got == grpc.StatusCode.UNIMPLEMENTED and "off" in message
        assert "system_shared_memory" not in triton.get_server_metadata().extensions
        _still_serves(triton)


# --- fuzzed registrations ----------------------------------------------------------------

_KEYS = st.one_of(
    st.just("real"),
    st.text(max_size=40),
    st.from_regex(r"/[a-z./]{0,12}", fullmatch=True),
)
_SIZES = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=st.text(max_size=20), key=_KEYS, offset=_SIZES, byte_size=_SIZES)
def test_fuzzed_registration(
    client: tc.InferenceServerClient,
    server: ServerProcess,
    name: str,
    key: str,
    offset: int,
    byte_size: int,
) -> None:
    """Any register parameters: success or a clear client-error status, never a crash."""
    made = Regions()
    try:
        real_name, real_key, _ = made.create(256)
        name = f"fuzz_{name}"
        try:
            _register(server.url, name, real_key if key == "real" else key, offset, byte_size)
        except grpc.RpcError as exc:
            assert exc.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.ALREADY_EXISTS,
            ), exc.details()
            assert exc.details()
        else:
            # Only the real key, or an object someone else keeps in /dev/shm.
            assert key != "real" or (byte_size > 0 and offset + byte_size <= 256)
            assert key == "real" or os.path.isfile(f"/dev/shm/{key.lstrip('/')}")
        client.unregister_system_shared_memory(name)
        del real_name
    finally:
        made.destroy_all()
    assert server.process.poll() is None


# --- perf_analyzer -----------------------------------------------------------------------


def test_perf_analyzer_shared_memory_mode(server: ServerProcess) -> None:
    """perf_analyzer --shared-memory system runs clean against Lockgate, where installed."""
    import shutil

    beside = Path(sys.executable).parent / "perf_analyzer"
    binary = shutil.which("perf_analyzer") or (str(beside) if beside.exists() else None)
    if binary is None:
        pytest.skip("perf_analyzer is not installed")
    probe = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    if "error while loading shared libraries" in probe.stderr:
        pytest.skip(f"perf_analyzer cannot start here: {probe.stderr.strip()}")
    before = set(os.listdir("/dev/shm"))
    result = subprocess.run(
        [
            binary,
            "-m",
            "simple",
            "-i",
            "grpc",
            "-u",
            server.url,
            "--shared-memory",
            "system",
            "--measurement-interval",
            "500",
            "--concurrency-range",
            "2",
            # Measure; never fail on a noisy machine's instability.
            "--stability-percentage",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Throughput" in result.stdout
    assert "Unable" not in result.stdout + result.stderr
    assert set(os.listdir("/dev/shm")) <= before
    with tc.InferenceServerClient(server.url) as triton:
        # Its regions were unregistered (it unregisters every region at exit).
        assert not any(
            status.key.startswith("/simple") or "input" in status.name
            for status in triton.get_system_shared_memory_status().regions.values()
        )


# --- authorization -----------------------------------------------------------------------


def test_registration_needs_the_shm_scope(
    start_server: Callable[..., ServerProcess],
    model_repository: Path,
    regions: Regions,
    tmp_path: Path,
) -> None:
    """infer may use registered regions; registering, listing and unregistering need shm."""
    tokens = tmp_path / "tokens"
    tokens.write_text("reader infer\nsharer infer,shm\nadmin control\n")
    server = start_server(model_repository, "--auth-token-file", str(tokens))
    name, key, handle = regions.create(128)
    a, b = _simple_inputs()
    shm.set_shared_memory_region(handle, [a, b])

    def headers(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    with tc.InferenceServerClient(server.url) as triton:
        for call in (
            lambda: triton.register_system_shared_memory(name, key, 128, headers=headers("reader")),
            lambda: triton.get_system_shared_memory_status(headers=headers("reader")),
            lambda: triton.unregister_system_shared_memory(headers=headers("reader")),
        ):
            assert _code(call)[0] == grpc.StatusCode.PERMISSION_DENIED
        triton.register_system_shared_memory(name, key, 128, headers=headers("sharer"))
        assert name in triton.get_system_shared_memory_status(headers=headers("admin")).regions
        inputs = [
            tc.InferInput("INPUT0", [1, 16], "INT32"),
            tc.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_shared_memory(name, 64)
        inputs[1].set_shared_memory(name, 64, offset=64)
        result = triton.infer("simple", inputs, headers=headers("reader"))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        triton.unregister_system_shared_memory(name, headers=headers("admin"))


# --- the SDK -------------------------------------------------------------------------------


def _sdk_keys() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"lockgate_{os.getpid()}_")}


def test_sdk_region_inputs_and_outputs(server: ServerProcess) -> None:
    from lockgate_client import AlreadyExistsError, Client, SharedMemoryRegion

    a, b = _simple_inputs()
    with Client(server.url) as client:
        with client.create_shared_memory(f"sdk_{os.getpid()}", 1024) as region:
            assert isinstance(region, SharedMemoryRegion)
            status = client.shared_memory_status(region.name)
            assert [(s.name, s.key, s.byte_size) for s in status] == [
                (region.name, region.key, 1024)
            ]
            inputs = {"INPUT0": region.write(a), "INPUT1": region.write(b)}
            sums = region.output(64)
            outputs = client.infer("simple", inputs, outputs={"OUTPUT0": sums, "OUTPUT1": None})
            np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
            np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)  # inline
            # The shared output is a view of the region, no copy.
            assert np.shares_memory(outputs["OUTPUT0"], region.read("INT32", [1, 16], sums.offset))
            # Writing again reuses the room: the next call sees the new values.
            region.reset()
            inputs = {"INPUT0": region.write(b), "INPUT1": region.write(b)}
            again = client.infer("simple", inputs, outputs={"OUTPUT0": sums})
            np.testing.assert_array_equal(again["OUTPUT0"], b + b)
            del outputs, again
            with pytest.raises(AlreadyExistsError):
                client.register_shared_memory(region)
            with pytest.raises(ValueError, match="do not fit"):
                region.write(np.zeros(1024, np.int32))
        # close() unregistered it and removed the object.
        assert region.name not in {s.name for s in client.shared_memory_status()}
    assert _sdk_keys() == set()


#: The identity models of the test repository: identity_<kind>, one per datatype.
IDENTITY_KINDS = [k.lower() for k in WIRE_DTYPES if k != "BYTES"] + ["string"]


@pytest.mark.frontends(1, 2)
@pytest.mark.parametrize("kind", IDENTITY_KINDS)
def test_every_datatype_through_a_region(server: ServerProcess, kind: str) -> None:
    """Input and output in a region: with --frontends 2 the engine writes the output there."""
    from lockgate_client import Client

    rng = np.random.default_rng(len(kind))
    datatype = "BYTES" if kind == "string" else kind.upper()
    if kind == "string":
        array: Array = np.array([[f"v{i}" * i for i in range(7)]] * 3, dtype=np.object_)
    elif kind == "bool":
        array = rng.integers(0, 2, (3, 7)).astype(np.bool_)
    elif kind in ("fp16", "fp32", "fp64", "bf16"):
        wire = np.float32 if kind == "bf16" else WIRE_DTYPES[datatype]
        array = rng.integers(-60, 60, (3, 7)).astype(wire) / 2  # exact in every width
    else:
        info = np.iinfo(WIRE_DTYPES[datatype].str)
        array = rng.integers(info.min, info.max, (3, 7), dtype=WIRE_DTYPES[datatype])
    with (
        Client(server.url, timeout=30) as client,
        client.create_shared_memory(f"dt_{kind}_{os.getpid()}", 4096) as region,
    ):
        placed = region.output(1024)
        outputs = client.infer(
            f"identity_{kind}",
            {"INPUT0": region.write(array, datatype=datatype)},
            outputs={"OUTPUT0": placed},
        )
        got = outputs["OUTPUT0"]
        if kind == "string":
            assert [[x.decode() for x in row] for row in got.tolist()] == array.tolist()
        else:
            np.testing.assert_array_equal(got, array)
        del outputs, got


def test_sdk_region_bytes(server: ServerProcess) -> None:
    from lockgate_client import Client

    a = np.array([[str(i) for i in range(16)]], dtype=object)
    b = np.array([["2"] * 16], dtype=object)
    with (
        Client(server.url) as client,
        client.create_shared_memory(f"sdk_bytes_{os.getpid()}", 4096) as region,
    ):
        inputs = {"INPUT0": region.write(a), "INPUT1": region.write(b)}
        outputs = client.infer(
            "simple_string",
            inputs,
            outputs={"OUTPUT0": region.output(1024), "OUTPUT1": region.output(1024)},
        )
        assert [int(x) for x in outputs["OUTPUT0"].reshape(-1)] == [i + 2 for i in range(16)]
        assert [int(x) for x in outputs["OUTPUT1"].reshape(-1)] == [i - 2 for i in range(16)]
    assert _sdk_keys() == set()


def test_sdk_async_region(server: ServerProcess) -> None:
    import asyncio

    from lockgate_client import AsyncClient, ModelNotFoundError

    a, b = _simple_inputs()

    async def main() -> None:
        async with AsyncClient(server.url) as client:
            region = await client.create_shared_memory(f"sdk_aio_{os.getpid()}", 256)
            try:
                inputs = {"INPUT0": region.write(a), "INPUT1": region.write(b)}
                room = region.output(64)
                outputs = await client.infer("simple", inputs, outputs={"OUTPUT0": room})
                np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
                del outputs
                await client.unregister_shared_memory(region)
                with pytest.raises(ModelNotFoundError, match="not registered"):
                    await client.infer("simple", inputs)
            finally:
                region.close()

    asyncio.run(main())
    assert _sdk_keys() == set()


def test_cli_bench_shared_memory(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """lockgate bench --shared-memory system: a region per worker, all removed after."""
    import json

    from lockgate.cli import main

    for model in ("simple", "simple_string", "nobatch"):
        code = main(
            [
                *("bench", model, "--url", server.url, "--concurrency", "1,3"),
                *("--duration", "0.5", "--warmup", "0", "--json", "--batch", "2"),
                *("--shared-memory", "system"),
            ]
        )
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and report["shared_memory"] == "system"
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in report["results"]), report
    assert _sdk_keys() == set()
    with tc.InferenceServerClient(server.url) as triton:
        regions = triton.get_system_shared_memory_status().regions
        assert not [name for name in regions if name.startswith("lockgate_bench_")]


def test_model_unload_leaves_regions_alone(
    start_server: Callable[..., ServerProcess], model_repository: Path, regions: Regions
) -> None:
    server = start_server(
        model_repository, "--model-control-mode", "explicit", "--load-model", "simple"
    )
    name, key, handle = regions.create(128)
    a, b = _simple_inputs()
    shm.set_shared_memory_region(handle, [a, b])
    with tc.InferenceServerClient(server.url) as triton:
        triton.register_system_shared_memory(name, key, 128)
        triton.unload_model("simple")
        assert name in triton.get_system_shared_memory_status().regions
        assert _mapped(server, key)
        triton.load_model("simple")
        got, message = _infer_with(
            server.url, {"shared_memory_region": name, "shared_memory_byte_size": 64}
        )
        assert got == grpc.StatusCode.OK, message
        triton.unregister_system_shared_memory(name)


# --- several front-end processes ----------------------------------------------------------


def _family_maps(server: ServerProcess, key: str) -> list[int]:
    """Pids among the server's processes (supervisor, engine, front ends) that map ``key``."""
    pids = [server.process.pid]
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The field after the parenthesised command name: state, then ppid.
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == server.process.pid:
                pids.append(int(entry))
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if f"/dev/shm/{key.lstrip('/')}" in Path(f"/proc/{pid}/maps").read_text():
                found.append(pid)
    return found


def _until(check: Callable[[], bool], what: str) -> None:
    """Front ends learn of regions from the engine's next snapshot: wait for it."""
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_regions_across_front_end_processes(
    start_server: Callable[..., ServerProcess], model_repository: Path, regions: Regions
) -> None:
    """With --frontends 2 a region registered through one front end serves them all."""
    server = start_server(model_repository, "--frontends", "2")
    name, key, handle = regions.create(128 + 64 * 16)
    a, b = _simple_inputs()
    shm.set_shared_memory_region(handle, [a, b])
    with tc.InferenceServerClient(server.url) as triton:
        triton.register_system_shared_memory(name, key, 128 + 64 * 16)
    # The engine maps it (and reads inputs from its own mapping), as do the front ends.
    _until(lambda: len(_family_maps(server, key)) == 3, "engine and both front ends map it")
    for slot in range(16):  # new connections: spread over both front ends
        with tc.InferenceServerClient(server.url) as other:
            _until(
                lambda o=other: name in o.get_system_shared_memory_status().regions,  # type: ignore[misc]
                "the region reaches every front end",
            )
            inputs = [
                tc.InferInput("INPUT0", [1, 16], "INT32"),
                tc.InferInput("INPUT1", [1, 16], "INT32"),
            ]
            inputs[0].set_shared_memory(name, 64)
            inputs[1].set_shared_memory(name, 64, offset=64)
            outputs = [tc.InferRequestedOutput("OUTPUT0")]
            outputs[0].set_shared_memory(name, 64, offset=128 + 64 * slot)
            other.infer("simple", inputs, outputs=outputs)
            got = shm.get_contents_as_numpy(handle, np.int32, [1, 16], offset=128 + 64 * slot)
            np.testing.assert_array_equal(got, a + b)
    with tc.InferenceServerClient(server.url) as triton:
        triton.unregister_system_shared_memory()
    _until(lambda: not _family_maps(server, key), "every process unmaps it")
    assert os.path.exists(f"/dev/shm{key}")
