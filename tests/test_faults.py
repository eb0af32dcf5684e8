"""Faults the server must survive with the right status while other models keep serving.

A corrupted or deleted model file, an ONNX Runtime exception, a client that
disconnects mid-stream (cancelled, or killed outright), and a full queue. One
private server in explicit model-control mode serves a repository built for
this module. Queued work is observed through the
``nv_inference_pending_request_count`` gauge; nothing asserts on a duration.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from support import ROOT, SERVICE, ServerProcess, launch_server, stub
from tritonclient.utils import InferenceServerException

from lockgate_client._proto import grpc_service_pb2 as pb
from models.build import build_gather_fail, build_identity, build_simple, build_slow

#: Bound on every wait for the server; reaching it is a failure, never a pass.
PATIENCE_S = 30.0
WIDTH = 256
QUEUE_OF_TWO = "default_queue_policy { max_queue_size: 2 }"
#: A batch runs only when 8 rows are queued: the test decides when.
HOLD = "preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 60000000"  # one minute


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("faults-repo")
    build_simple(repo)
    build_gather_fail(repo)
    build_identity(repo, "victim", "TYPE_INT32")
    build_slow(repo, "hold", iterations=1, dynamic_batching=f"dynamic_batching {{ {HOLD} }}")
    build_slow(
        repo,
        "queue_full",
        iterations=1,
        dynamic_batching=f"dynamic_batching {{ {HOLD} {QUEUE_OF_TWO} }}",
    )
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = launch_server(
        repo,
        tmp_path_factory.mktemp("faults-logs"),
        *("--model-control-mode", "explicit", "--load-model", "*", "--drain-seconds", "5"),
    )
    yield proc
    assert proc.stop() == 0, proc.log()


# --- helpers -----------------------------------------------------------------------------------


def int32_input(name: str, value: Any, width: int) -> tc.InferInput:
    data = np.full((1, width), value, dtype=np.int32)
    tensor = tc.InferInput(name, [1, width], "INT32")
    tensor.set_data_from_numpy(data)
    return tensor


def assert_others_serve(client: tc.InferenceServerClient) -> None:
    """``simple`` answers correctly: a fault elsewhere did not spread."""
    result = client.infer("simple", [int32_input("INPUT0", 5, 16), int32_input("INPUT1", 2, 16)])
    assert result.as_numpy("OUTPUT0").tolist() == [[7] * 16]
    assert result.as_numpy("OUTPUT1").tolist() == [[3] * 16]


def victim_output(client: tc.InferenceServerClient) -> list[list[int]]:
    result = client.infer("victim", [int32_input("INPUT0", 42, 3)])
    return result.as_numpy("OUTPUT0").tolist()  # type: ignore[no-any-return]


def error_of(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def pending(server: ServerProcess, model: str) -> int:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    prefix = "nv_inference_pending_request_count{"
    for line in text.splitlines():
        if line.startswith(prefix) and f'model="{model}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def wait_pending(server: ServerProcess, model: str, count: int) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while pending(server, model) != count:
        if time.monotonic() > deadline:
            pytest.fail(f"{model}: never {count} queued (now {pending(server, model)})")
        time.sleep(0.02)


def slow_request(model: str, tag: float, rows: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=str(tag))
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, WIDTH])
    request.raw_input_contents.append(np.full((rows, WIDTH), tag, np.float32).tobytes())
    return request


def infer_call(channel: grpc.Channel) -> Any:
    return stub(channel, "ModelInfer", pb.ModelInferResponse)


def assert_hold_serves(channel: grpc.Channel) -> None:
    """A full batch of 8 rows runs at once on a model whose queue is now empty."""
    reply = infer_call(channel)(slow_request("hold", 8.0, rows=8), timeout=PATIENCE_S)
    out = np.frombuffer(reply.raw_output_contents[0], np.float32)
    assert out.shape == (8 * WIDTH,) and (out == 8.0).all()


# --- corrupted and deleted model files -------------------------------------------------------


def test_corrupted_model_file(
    server: ServerProcess, client: tc.InferenceServerClient, repo: Path
) -> None:
    model_file = repo / "victim" / "1" / "model.onnx"
    good = model_file.read_bytes()
    assert victim_output(client) == [[42] * 3]
    try:
        model_file.write_bytes(good[: len(good) // 2])  # truncated mid-write
        error = error_of(lambda: client.load_model("victim"))
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "victim" in (error.message() or "")
        # The reload failed cleanly: the version loaded before keeps serving.
        assert client.is_model_ready("victim")
        assert victim_output(client) == [[42] * 3]
        assert_others_serve(client)

        model_file.write_bytes(b"\x08\x07garbage that is not a protobuf model")
        assert error_of(lambda: client.load_model("victim")).status() == (
            "StatusCode.INVALID_ARGUMENT"
        )
        assert victim_output(client) == [[42] * 3]

        # Unloaded, it cannot come back while its file is broken: UNAVAILABLE, with why.
        client.unload_model("victim")
        error_of(lambda: client.load_model("victim"))
        error = error_of(lambda: victim_output(client))
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert "victim" in (error.message() or "")
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["victim"].state == "UNAVAILABLE"
        assert_others_serve(client)
    finally:
        model_file.write_bytes(good)
    client.load_model("victim")
    assert victim_output(client) == [[42] * 3]
    assert server.process.poll() is None


def test_deleted_model_file(
    server: ServerProcess, client: tc.InferenceServerClient, repo: Path
) -> None:
    try:
        (repo / "victim" / "1" / "model.onnx").unlink()
        error = error_of(lambda: client.load_model("victim"))
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "model.onnx" in (error.message() or "")
        assert victim_output(client) == [[42] * 3]  # the loaded version is in memory
        shutil.rmtree(repo / "victim")  # the whole model gone
        assert error_of(lambda: client.load_model("victim")).status() == "StatusCode.NOT_FOUND"
        assert victim_output(client) == [[42] * 3]
        assert_others_serve(client)
    finally:
        build_identity(repo, "victim", "TYPE_INT32")  # the same bytes again
    client.load_model("victim")
    assert victim_output(client) == [[42] * 3]


# --- an ONNX Runtime exception ------------------------------------------------------------------


def test_onnxruntime_exception(client: tc.InferenceServerClient) -> None:
    def gather(index: int) -> Any:
        data = tc.InferInput("INPUT", [1, 4], "FP32")
        data.set_data_from_numpy(np.array([[10, 11, 12, 13]], np.float32))
        where = tc.InferInput("INDEX", [1, 1], "INT64")
        where.set_data_from_numpy(np.array([[index]], np.int64))
        return client.infer("gather_fail", [data, where]).as_numpy("OUTPUT")

    for bad in (4, -5, 2**40):
        error = error_of(lambda b=bad: gather(b))  # type: ignore[misc]
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert error.message()
    assert gather(2).tolist() == [[12.0]]  # the same model, next request: fine
    assert_others_serve(client)


# --- clients that leave mid-stream ---------------------------------------------------------------


CHILD = textwrap.dedent(
    """
    import sys, threading, grpc
    import numpy as np
    from lockgate_client._proto import grpc_service_pb2 as pb

    def requests():
        for tag in range(3):
            r = pb.ModelInferRequest(model_name="hold", id=str(tag))
            r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 256])
            r.raw_input_contents.append(np.zeros((1, 256), np.float32).tobytes())
            yield r.SerializeToString()
        threading.Event().wait()  # keep the stream open, never finish it

    channel = grpc.insecure_channel(sys.argv[1])
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    for _ in stream(requests()):
        pass
    """
)


def test_client_killed_mid_stream(server: ServerProcess, client: tc.InferenceServerClient) -> None:
    """A client process that dies with requests queued: they are dropped, nothing leaks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "client")}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, server.url], env=env, stderr=subprocess.PIPE
    )
    try:
        wait_pending(server, "hold", 3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    wait_pending(server, "hold", 0)
    with grpc.insecure_channel(server.url) as channel:
        assert_hold_serves(channel)
    assert_others_serve(client)
    assert server.process.poll() is None


def test_client_cancels_mid_stream(server: ServerProcess, client: tc.InferenceServerClient) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stream = channel.stream_stream(
            SERVICE + "ModelStreamInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        requests = (slow_request("hold", float(tag)) for tag in range(5))
        call = stream(requests, timeout=PATIENCE_S)
        wait_pending(server, "hold", 5)
        call.cancel()  # type: ignore[no-untyped-call]
        wait_pending(server, "hold", 0)
        assert_hold_serves(channel)
    assert_others_serve(client)


# --- a full queue -------------------------------------------------------------------------------


def test_full_queue(server: ServerProcess, client: tc.InferenceServerClient) -> None:
    with grpc.insecure_channel(server.url) as channel:
        infer = infer_call(channel)
        queued = [infer.future(slow_request("queue_full", float(t)), timeout=120) for t in (1, 2)]
        try:
            wait_pending(server, "queue_full", 2)
            with pytest.raises(grpc.RpcError) as info:
                infer(slow_request("queue_full", 3.0), timeout=PATIENCE_S)
            error: Any = info.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue" in error.details()
            assert_others_serve(client)  # a full queue is one model's business
        finally:
            for future in queued:
                future.cancel()
        wait_pending(server, "queue_full", 0)
        # Room again: a full batch runs at once.
        reply = infer(slow_request("queue_full", 4.0, rows=8), timeout=PATIENCE_S)
        assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [4.0] * (
            8 * WIDTH
        )
    assert_others_serve(client)
