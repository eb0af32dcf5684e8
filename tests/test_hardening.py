"""Hardening, round two: what a hostile client and real models found (issue 13).

One private server with small stream and health limits; each test crosses one
limit or sends one input that used to end badly (no answer, INTERNAL, a
stalled event loop, unbounded memory) and checks the status code, the message
and that the server keeps serving.
"""

from __future__ import annotations

import asyncio
import queue
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from support import ServerProcess, launch_server

from lockgate.batcher import Scheduler
from lockgate.config import MAX_PRIORITY_LEVELS, ServerConfig, validate_config
from lockgate.errors import InvalidInputError, ModelLoadError
from lockgate.health import MAX_HEALTH_REQUEST_BYTES
from lockgate.lifecycle import Lifecycle
from lockgate.repository import ModelRepository
from lockgate.stats import ModelStats
from lockgate.uploads import MAX_UPLOAD_PATH_DEPTH, remove_scratch, write_model_files
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as svc
from lockgate_client._proto import model_config_pb2 as mc
from models.build import build_broken, build_identity, build_slow

Tensor = pb.ModelInferRequest.InferInputTensor
INVALID = grpc.StatusCode.INVALID_ARGUMENT
STREAM_REQUESTS = 4
HEALTH_WATCHES = 2
#: Elements of one large identity_fp32 request: 1 MiB each way.
LARGE = 2**18


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("hardening-repo")
    build_identity(repo, "identity_fp32", "TYPE_FP32")
    build_identity(repo, "identity_string", "TYPE_STRING")
    # Two variable dimensions: [1, 0, huge] has zero elements.
    build_identity(repo, "identity_2d", "TYPE_FP32", dims=(-1, -1))
    proc = launch_server(
        repo,
        tmp_path_factory.mktemp("hardening-logs"),
        *("--max-stream-requests", str(STREAM_REQUESTS)),
        *("--max-health-watches", str(HEALTH_WATCHES)),
    )
    yield proc
    proc.stop()


@pytest.fixture
def stub(hardened: ServerProcess) -> Iterator[svc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(hardened.url) as channel:
        yield svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def fp32(elements: int = 2, **fields: Any) -> pb.ModelInferRequest:
    data = np.arange(elements, dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="identity_fp32",
        inputs=[Tensor(name="INPUT0", datatype="FP32", shape=[1, elements])],
        raw_input_contents=[data.tobytes()],
        **fields,
    )


def strings(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def refused(action: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        action()
    error: Any = info.value
    return error.code(), error.details() or ""


def assert_serving(stub: svc.GRPCInferenceServiceStub) -> None:
    reply = stub.ModelInfer(fp32(), timeout=60)
    assert reply.raw_output_contents[0] == np.arange(2, dtype=np.float32).tobytes()


# --- 1. every stream request gets an answer; client mistakes are INVALID_ARGUMENT ---------------

HUGE_VERSION = "9" * 5000


def zero_elements_huge_dimension() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="identity_2d",
        inputs=[Tensor(name="INPUT0", datatype="FP32", shape=[1, 0, 2**62])],
        raw_input_contents=[b""],
    )


@pytest.mark.parametrize(
    "request_", [fp32(model_version=HUGE_VERSION), zero_elements_huge_dimension()]
)
def test_stream_answers_every_request(
    stub: svc.GRPCInferenceServiceStub, request_: pb.ModelInferRequest
) -> None:
    request_.id = "bad"
    good = fp32(id="good")
    answers = list(stub.ModelStreamInfer(iter([request_, good]), timeout=60))
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"bad", "good"}
    assert by_id["bad"].error_message.startswith("[INVALID_ARGUMENT]")
    assert not by_id["good"].error_message


def test_unary_client_mistakes_are_invalid_argument(stub: svc.GRPCInferenceServiceStub) -> None:
    code, message = refused(lambda: stub.ModelInfer(fp32(model_version=HUGE_VERSION), timeout=60))
    assert code == INVALID and "not a version number" in message
    assert len(message) < 1000  # the 5,000 digits are not echoed back
    code, message = refused(lambda: stub.ModelInfer(zero_elements_huge_dimension(), timeout=60))
    assert code == INVALID and "dimension" in message
    code, _ = refused(
        lambda: stub.ModelReady(
            pb.ModelReadyRequest(name="identity_fp32", version=HUGE_VERSION), timeout=60
        )
    )
    assert code == INVALID
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=60).ready
    assert_serving(stub)


# --- 2. large requests: counts capped before iterating; decoding off the event loop -----------


def test_inputs_and_outputs_are_counted_before_iterating(
    stub: svc.GRPCInferenceServiceStub,
) -> None:
    request = fp32()
    request.inputs.extend(Tensor() for _ in range(100_000))
    code, message = refused(lambda: stub.ModelInfer(request, timeout=60))
    assert code == INVALID and "100001 inputs but the model has only 1" in message
    request = fp32()
    request.outputs.extend(
        pb.ModelInferRequest.InferRequestedOutputTensor() for _ in range(100_000)
    )
    code, message = refused(lambda: stub.ModelInfer(request, timeout=60))
    assert code == INVALID and "100000 outputs but the model has only 1" in message
    assert_serving(stub)


def test_bytes_element_count_is_capped(stub: svc.GRPCInferenceServiceStub) -> None:
    count = 2**20 + 1  # the default --max-bytes-tensor-elements, plus one
    request = pb.ModelInferRequest(
        model_name="identity_string",
        inputs=[Tensor(name="INPUT0", datatype="BYTES", shape=[1, count])],
        raw_input_contents=[bytes(4 * count)],  # that many empty strings
    )
    code, message = refused(lambda: stub.ModelInfer(request, timeout=60))
    assert code == INVALID and f"{count} BYTES elements" in message
    assert_serving(stub)


def test_health_is_answered_while_a_large_request_decodes(hardened: ServerProcess) -> None:
    """A million BYTES elements take the decoder a while; health checks must not wait.

    The last element is not UTF-8, so the request is refused when decoding
    ends: all its time on the server is decoding.
    """
    count = 2**20
    payload = strings(*([b"a"] * (count - 1)), b"\xff")
    request = pb.ModelInferRequest(
        model_name="identity_string",
        inputs=[Tensor(name="INPUT0", datatype="BYTES", shape=[1, count])],
        raw_input_contents=[payload],
    )
    with grpc.insecure_channel(hardened.url) as channel:
        infer = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=60)  # connected
        large = infer.ModelInfer.future(request, timeout=120)
        answered_meanwhile = 0
        while not large.done():
            health.Check(health_pb2.HealthCheckRequest(), timeout=60)
            if not large.done():
                answered_meanwhile += 1
        code, message = refused(large.result)
    assert code == INVALID and "not valid UTF-8" in message
    # On the event loop, decoding held every health check until it ended.
    assert answered_meanwhile >= 3


# --- 3. health: open to everyone, so bounded --------------------------------------------------


def test_oversized_health_requests_are_refused(hardened: ServerProcess) -> None:
    name = "x" * (MAX_HEALTH_REQUEST_BYTES + 1)
    with grpc.insecure_channel(hardened.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        code, message = refused(
            lambda: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=60)
        )
        assert code == INVALID and "health request" in message
        watch = health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=60)
        code, _ = refused(lambda: next(iter(watch)))
        assert code == INVALID
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_health_watches_are_capped(hardened: ServerProcess) -> None:
    with grpc.insecure_channel(hardened.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [
            health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
            for _ in range(HEALTH_WATCHES)
        ]
        try:
            for watch in watches:
                assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
            extra = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            code, message = refused(lambda: next(iter(extra)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-health-watches" in message
            watches[0].cancel()  # type: ignore[attr-defined]
            # The cancelled watch frees its place once the server has seen it go.
            for _ in range(100):
                again = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
                try:
                    status = next(iter(again)).status
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    time.sleep(0.1)
                    continue
                assert status == health_pb2.HealthCheckResponse.SERVING
                again.cancel()  # type: ignore[attr-defined]
                break
            else:
                pytest.fail("a cancelled Watch never freed its place")
        finally:
            for watch in watches:
                watch.cancel()  # type: ignore[attr-defined]


# --- 4. stream backpressure --------------------------------------------------------------------


def inference_count(stub: svc.GRPCInferenceServiceStub) -> int:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="identity_fp32"), timeout=60)
    return int(stats.model_stats[0].inference_count)


def test_a_stream_whose_answers_are_not_read_is_not_read_either(
    stub: svc.GRPCInferenceServiceStub,
) -> None:
    """A client that sends and never reads holds the server back, not its memory.

    Each answer is 1 MiB; the server may run the requests whose answers fit
    in the transport's buffers plus ``--max-stream-requests``, then stops
    reading the stream until the client reads.
    """
    sent = 48
    before = inference_count(stub)
    feed: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    for i in range(sent):
        feed.put(fp32(LARGE, id=str(i)))

    def requests() -> Iterator[pb.ModelInferRequest]:
        while (item := feed.get()) is not None:
            yield item

    call = stub.ModelStreamInfer(requests(), timeout=300)
    try:
        # Wait until the server has stopped running requests (or ran them all).
        ran, steady_since = -1, time.monotonic()
        while time.monotonic() - steady_since < 3.0:
            now = inference_count(stub) - before
            if now != ran:
                ran, steady_since = now, time.monotonic()
            if ran == sent:
                break
            time.sleep(0.2)
        assert ran < sent / 2, f"the server ran {ran} of {sent} requests nobody read"
        feed.put(None)
        # Reading resumes the stream: every answer arrives.
        answered = [a.infer_response.id for a in call]  # type: ignore[attr-defined]
        assert sorted(answered, key=int) == [str(i) for i in range(sent)]
    finally:
        feed.put(None)
        call.cancel()  # type: ignore[attr-defined]
    assert_serving(stub)


# --- 5. priority levels ------------------------------------------------------------------------


def batching_config(levels: int) -> mc.ModelConfig:
    config = mc.ModelConfig(name="m", max_batch_size=4)
    config.dynamic_batching.priority_levels = levels
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[2])
    config.output.add(name="y", data_type=mc.TYPE_FP32, dims=[2])
    return config


def test_priority_levels_are_bounded_at_load() -> None:
    with pytest.raises(ModelLoadError, match=f"limit of {MAX_PRIORITY_LEVELS}"):
        validate_config(batching_config(10**9))
    validate_config(batching_config(MAX_PRIORITY_LEVELS))


def test_priority_levels_are_made_when_used() -> None:
    """The most levels a config may declare cost nothing until requests use them."""
    config = batching_config(MAX_PRIORITY_LEVELS)
    tracemalloc.start()
    try:
        Scheduler(config, [], ModelStats(name="m", version="1")).close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


# --- 6. upload paths ---------------------------------------------------------------------------


def test_deep_upload_paths_are_refused() -> None:
    deep = "d/" * 2000 + "model.onnx"
    with pytest.raises(InvalidInputError, match="too long"):
        write_model_files("deep", {deep: b"x"})
    shallow = "d/" * (MAX_UPLOAD_PATH_DEPTH - 1) + "model.onnx"
    model_dir = write_model_files("shallow", {shallow: b"x"})
    try:
        assert (model_dir / shallow).read_bytes() == b"x"
    finally:
        remove_scratch(model_dir)


# --- 7. loading models are LOADING -------------------------------------------------------------

#: Enough warmup runs of ``slow`` (~50 ms each) to keep it loading for a while.
SLOW_WARMUP = """
model_warmup [ { name: "hold" batch_size: 1 count: 40
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 256 ] zero_data: true } } } ]
"""


def test_a_loading_model_is_reported_loading(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    build_slow(tmp_path, config_extra=SLOW_WARMUP)
    server = start_server(tmp_path, "--model-control-mode", "explicit")
    with grpc.insecure_channel(server.url) as channel:
        stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        loading = stub.RepositoryModelLoad.future(
            pb.RepositoryModelLoadRequest(model_name="slow"), timeout=300
        )
        seen: set[tuple[str, str, str]] = set()
        while not loading.done():
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=60)
            seen |= {(m.name, m.state, m.reason) for m in index.models}
        loading.result()
        assert ("slow", "LOADING", "") in seen, seen
        # Before the load began it may have been listed as on disk, "not loaded";
        # never as UNAVAILABLE with no reason.
        assert ("slow", "UNAVAILABLE", "") not in seen, seen
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=60)
        assert [(m.name, m.version, m.state) for m in index.models] == [("slow", "1", "READY")]


# --- 8. two models under one name --------------------------------------------------------------


@pytest.mark.parametrize("layout", ["files", "repositories"])
def test_two_models_with_one_name_are_refused(tmp_path: Path, layout: str) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    if layout == "files":
        for directory in (first, second):
            build_identity(directory, "model", "TYPE_FP32")
        paths = [first / "model" / "1" / "model.onnx", second / "model" / "1" / "model.onnx"]
        (first / "model.onnx").write_bytes(paths[0].read_bytes())
        (second / "model.onnx").write_bytes(paths[1].read_bytes())
        locations = [first / "model.onnx", second / "model.onnx"]
    else:
        for directory in (first, second):
            build_identity(directory, "model", "TYPE_FP32")
        locations = [first, second]
    server = launch_server(
        locations[0], tmp_path, "--model-repository", str(locations[1]), wait=False
    )
    try:
        assert server.process.wait(60) == 1
    finally:
        server.stop(5)
    log = server.log()
    assert "two models are named 'model'" in log
    assert "rename one of them" in log


# --- readiness: a new model that fails does not take a serving server out of rotation ---------


def test_a_new_model_that_fails_leaves_readiness_alone(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    build_identity(tmp_path, "identity_fp32", "TYPE_FP32")
    build_broken(tmp_path)
    server = start_server(
        tmp_path,
        "--strict-readiness",
        *("--model-control-mode", "explicit", "--load-model", "identity_fp32"),
    )
    with grpc.insecure_channel(server.url) as channel:
        stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(channel)
        code, message = refused(
            lambda: stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="broken"), timeout=120
            )
        )
        assert code == INVALID and "broken" in message
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=60).ready
        # The failed model's own health service says it is not serving.
        reply = health.Check(health_pb2.HealthCheckRequest(service="broken"), timeout=60)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert_serving(stub)


def test_a_model_that_fails_at_startup_keeps_the_server_unready(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """What the server was started to serve is owed: a rollout with a broken model halts."""
    build_identity(tmp_path, "identity_fp32", "TYPE_FP32")
    build_broken(tmp_path)
    server = start_server(tmp_path, "--strict-readiness", wait=False)
    with grpc.insecure_channel(server.url) as channel:
        stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(channel)
        model = health_pb2.HealthCheckRequest(service="identity_fp32")
        for _ in range(600):  # per-model health is published with readiness, after startup
            try:
                if health.Check(model, timeout=60).status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("startup loading never ended")
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=60).ready
        assert_serving(stub)


# --- error messages with real models: scikit-learn's ZipMap -----------------------------------


def write_zipmap_classifier(repo: Path, config: str | None) -> None:
    """What skl2onnx makes of a classifier by default: a label tensor and a ZipMap."""
    graph = helper.make_graph(
        [
            helper.make_node("ArgMax", ["X"], ["label"], axis=1, keepdims=0),
            helper.make_node("Softmax", ["X"], ["probabilities"], axis=1),
            helper.make_node(
                "ZipMap",
                ["probabilities"],
                ["output_probability"],
                domain="ai.onnx.ml",
                classlabels_int64s=[0, 1],
            ),
        ],
        "classifier",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_value_info(
                "output_probability",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(
                        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
                    )
                ),
            ),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)]
    )
    model.ir_version = 8
    directory = repo / "classifier"
    (directory / "1").mkdir(parents=True)
    (directory / "1" / "model.onnx").write_bytes(model.SerializeToString())
    if config is not None:
        (directory / "config.pbtxt").write_text(config)


@pytest.mark.parametrize(
    "config",
    [
        None,
        'max_batch_size: 8\ninput [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
        'output [ { name: "label" data_type: TYPE_INT64 dims: [ 1 ] } ]\n',
    ],
    ids=["auto-complete", "max_batch_size"],
)
def test_a_zipmap_output_says_how_to_export_the_model(tmp_path: Path, config: str | None) -> None:
    write_zipmap_classifier(tmp_path, config)
    repository = ModelRepository(ServerConfig(model_repository=[str(tmp_path)]), Lifecycle())
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(repository.load_all())
    message = info.value.message
    assert "'output_probability' is a seq(map(int64,tensor(float)))" in message
    assert "zipmap" in message
    assert "batch dimension" not in message


# --- client strings are clipped in statuses and logs ------------------------------------------


def test_long_client_strings_are_clipped(
    stub: svc.GRPCInferenceServiceStub, hardened: ServerProcess
) -> None:
    """A 20 KB name must not turn NOT_FOUND into RESOURCE_EXHAUSTED (gRPC's metadata limit)."""
    name, request_id = "m" * 20_000, "i" * 1_000_000
    request = fp32(id=request_id)
    request.model_name = name
    code, message = refused(lambda: stub.ModelInfer(request, timeout=60))
    assert code == grpc.StatusCode.NOT_FOUND and len(message) < 1000
    code, message = refused(
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=60)
    )
    assert code == grpc.StatusCode.NOT_FOUND and len(message) < 1000
    answers = list(stub.ModelStreamInfer(iter([request]), timeout=60))
    assert answers[0].error_message.startswith("[NOT_FOUND]")
    assert len(answers[0].error_message) < 1000
    assert_serving(stub)
    assert max(len(line) for line in hardened.log().splitlines()) < 4000
