"""The model repository end to end: broken models, versions and version
policies, explicit load/unload, single-file serving, unimplemented RPCs,
gRPC health and server reflection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from support import ServerProcess, free_port, simple_inputs, wait_ready
from tritonclient.utils import InferenceServerException

from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as svc
from models.build import Tensor, config_text

Array = npt.NDArray[Any]
StartServer = Callable[..., ServerProcess]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def int32_input(rows: int = 1, width: int = 4, name: str = "INPUT0") -> tc.InferInput:
    tensor = tc.InferInput(name, [rows, width], "INT32")
    tensor.set_data_from_numpy(np.arange(rows * width, dtype=np.int32).reshape(rows, width))
    return tensor


def versioned_output(client: tc.InferenceServerClient, model: str, version: str = "") -> Array:
    result = client.infer(model, [int32_input()], model_version=version)
    out: Array | None = result.as_numpy("OUTPUT0")
    assert out is not None
    return out - np.arange(4, dtype=np.int32).reshape(1, 4)


def status_of(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def index_of(client: tc.InferenceServerClient) -> dict[str, Any]:
    return {m.name: m for m in client.get_model_repository_index().models}


def ready_names(client: tc.InferenceServerClient) -> set[str]:
    return {m.name for m in client.get_model_repository_index().models if m.state == "READY"}


# --- the session server: a broken model among good ones ---------------------------------


def test_broken_model_beside_good_ones(client: tc.InferenceServerClient) -> None:
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    broken = index[("broken", "1")]
    assert broken.state == "UNAVAILABLE"
    assert "model.onnx" in broken.reason
    for name in ("simple", "mlp", "autocomplete", "nobatch", "identity_bf16"):
        assert index[(name, "1")].state == "READY"
        assert index[(name, "1")].reason == ""
    assert client.is_server_ready()
    error = status_of(lambda: client.infer("broken", [int32_input()]))
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert "broken" in (error.message() or "")
    assert "model.onnx" in (error.message() or "")


def test_ready_index_lists_only_ready_versions(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10).models
    assert all(m.state == "READY" for m in ready)
    names = {m.name for m in ready}
    assert "broken" not in names
    assert {"simple", "versioned", "slow"} <= names


def test_latest_version_only_by_default(client: tc.InferenceServerClient) -> None:
    versions = [
        (m.version, m.state)
        for m in client.get_model_repository_index().models
        if m.name == "versioned"
    ]
    assert versions == [("3", "READY")]
    np.testing.assert_array_equal(versioned_output(client, "versioned"), 3)
    np.testing.assert_array_equal(versioned_output(client, "versioned", "3"), 3)
    error = status_of(lambda: versioned_output(client, "versioned", "1"))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "version 1" in (error.message() or "")
    assert client.is_model_ready("versioned", "3")
    assert not client.is_model_ready("versioned", "1")
    assert list(client.get_model_metadata("versioned").versions) == ["3"]


@pytest.mark.parametrize(
    ("call", "what"),
    [
        pytest.param(lambda c: c.get_cuda_shared_memory_status(), "CUDA shared memory", id="cuda"),
        pytest.param(
            lambda c: c.register_cuda_shared_memory("r", b"", 0, 64),
            "CUDA shared memory",
            id="cuda-register",
        ),
        pytest.param(lambda c: c.get_trace_settings(), "trace settings", id="trace"),
        pytest.param(
            lambda c: c.update_trace_settings(settings={"trace_rate": "1"}),
            "trace settings",
            id="trace-update",
        ),
        pytest.param(lambda c: c.get_log_settings(), "log settings", id="log"),
        pytest.param(
            lambda c: c.update_log_settings(settings={"log_info": True}),
            "log settings",
            id="log-update",
        ),
    ],
)
def test_unimplemented_rpcs(
    client: tc.InferenceServerClient,
    call: Callable[[tc.InferenceServerClient], object],
    what: str,
) -> None:
    error = status_of(lambda: call(client))
    assert error.status() == "StatusCode.UNIMPLEMENTED"
    assert what in (error.message() or "")
    assert "not" in (error.message() or "")
    assert client.is_server_live()


def test_load_and_unload_refused_without_explicit_mode(client: tc.InferenceServerClient) -> None:
    for call in (lambda: client.load_model("simple"), lambda: client.unload_model("simple")):
        error = status_of(call)
        assert error.status() == "StatusCode.FAILED_PRECONDITION"
        assert "--model-control-mode explicit" in (error.message() or "")
    assert client.is_model_ready("simple")


def test_grpc_health(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def check(service: str) -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            return int(health.Check(request, timeout=10).status)

        assert check("") == SERVING
        assert check("inference.GRPCInferenceService") == SERVING
        for name in ("simple", "mlp", "slow", "autocomplete", "versioned", "identity_string"):
            assert check(name) == SERVING, name
        assert check("broken") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            check("no_such_model")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.url) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "inference.GRPCInferenceService" in services
        assert "grpc.health.v1.Health" in services
        # Reflection serves the whole file tree: a client can build requests.
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        methods = {m.name for m in service.methods}
        assert {"ModelInfer", "ModelStreamInfer", "RepositoryIndex"} <= methods
        infer = service.methods_by_name["ModelInfer"]
        assert "raw_input_contents" in infer.input_type.fields_by_name


# --- version policies, and Triton config fields we do not act on -------------------------

VERSION_TENSORS = ([Tensor("INPUT0", "TYPE_INT32", (4,))], [Tensor("OUTPUT0", "TYPE_INT32", (4,))])

TRITON_EXTRAS = """
optimization {
  graph { level: 1 }
  execution_accelerators { gpu_execution_accelerator: [ { name: "cuda" } ] }
  input_pinned_memory { enable: true }
}
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
parameters { key: "unknown_to_lockgate" value: { string_value: "ignored" } }
model_warmup [
  {
    name: "zeros"
    batch_size: 2
    inputs { key: "INPUT0" value: { data_type: TYPE_INT32, dims: [ 16 ], zero_data: true } }
    inputs { key: "INPUT1" value: { data_type: TYPE_INT32, dims: [ 16 ], random_data: true } }
  }
]
response_cache { enable: false }
metric_tags { key: "team" value: "search" }
model_repository_agents { agents [ { name: "checksum" } ] }
"""


def _policy_repository(root: Path, source: Path) -> Path:
    repo = root / "policies"
    for name, policy in [
        ("versioned_all", "version_policy: { all { } }"),
        ("versioned_latest2", "version_policy: { latest { num_versions: 2 } }"),
        ("versioned_specific", "version_policy: { specific { versions: [ 1, 3 ] } }"),
    ]:
        for version in (1, 2, 3):
            target = repo / name / str(version)
            target.mkdir(parents=True)
            shutil.copy(source / "versioned" / str(version) / "model.onnx", target)
        text = config_text(name, 8, *VERSION_TENSORS, dynamic_batching=None, extra=policy)
        (repo / name / "config.pbtxt").write_text(text)
    extras = repo / "triton_extras"
    shutil.copytree(source / "simple", extras)
    text = (source / "simple" / "config.pbtxt").read_text()
    (extras / "config.pbtxt").write_text(
        text.replace('"simple"', '"triton_extras"') + TRITON_EXTRAS
    )
    bad = repo / "bad_config"
    shutil.copytree(source / "simple", bad)
    (bad / "config.pbtxt").write_text('name: "bad_config"\nmax_batch_size: lots\n')
    (repo / "no_versions").mkdir()
    (repo / "no_versions" / "config.pbtxt").write_text('name: "no_versions"\n')
    return repo


@pytest.fixture(scope="module")
def policy_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    from support import launch_server

    root = tmp_path_factory.mktemp("policy")
    proc = launch_server(_policy_repository(root, model_repository), root)
    yield proc
    proc.stop()


def test_version_policies(policy_server: ServerProcess) -> None:
    with tc.InferenceServerClient(policy_server.url) as client:
        index = client.get_model_repository_index().models
        served = {
            name: [m.version for m in index if m.name == name and m.state == "READY"]
            for name in ("versioned_all", "versioned_latest2", "versioned_specific")
        }
        assert served == {
            "versioned_all": ["1", "2", "3"],
            "versioned_latest2": ["2", "3"],
            "versioned_specific": ["1", "3"],
        }
        for version in ("1", "2", "3"):
            out = versioned_output(client, "versioned_all", version)
            np.testing.assert_array_equal(out, int(version))
        # No version asked: the highest ready one answers.
        np.testing.assert_array_equal(versioned_output(client, "versioned_all"), 3)
        metadata = client.get_model_metadata("versioned_all")
        assert sorted(metadata.versions) == ["1", "2", "3"]
        error = status_of(lambda: versioned_output(client, "versioned_specific", "2"))
        assert error.status() == "StatusCode.NOT_FOUND"
        stats = client.get_inference_statistics("versioned_all").model_stats
        assert sorted(s.version for s in stats) == ["1", "2", "3"]


def test_triton_config_extras_load(policy_server: ServerProcess) -> None:
    with tc.InferenceServerClient(policy_server.url) as client:
        assert client.is_model_ready("triton_extras")
        config = client.get_model_config("triton_extras").config
        assert config.parameters["unknown_to_lockgate"].string_value == "ignored"
        assert config.model_warmup[0].name == "zeros"
        assert config.optimization.graph.level == 1
        result = client.infer("triton_extras", simple_inputs(rows=2))
        out = result.as_numpy("OUTPUT0")
        assert out is not None
        np.testing.assert_array_equal(out, 2 * np.arange(32, dtype=np.int32).reshape(2, 16))


def test_unloadable_models_report_why(policy_server: ServerProcess) -> None:
    with tc.InferenceServerClient(policy_server.url) as client:
        index = index_of(client)
        assert index["bad_config"].state == "UNAVAILABLE"
        assert "config.pbtxt" in index["bad_config"].reason
        assert "2:" in index["bad_config"].reason  # the line at fault
        assert index["no_versions"].state == "UNAVAILABLE"
        assert "version" in index["no_versions"].reason
        error = status_of(lambda: client.infer("bad_config", simple_inputs()))
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert "config.pbtxt" in (error.message() or "")
        assert client.is_server_live()


# --- explicit model control --------------------------------------------------------------


def test_explicit_model_control(
    start_server: StartServer, model_repository: Path, tmp_path: Path
) -> None:
    proc = start_server(
        model_repository, "--model-control-mode", "explicit", "--load-model", "simple"
    )
    with tc.InferenceServerClient(proc.url) as client:
        assert ready_names(client) == {"simple"}
        assert client.is_model_ready("simple")
        assert not client.is_model_ready("nobatch")
        error = status_of(lambda: client.infer("nobatch", []))
        assert error.status() == "StatusCode.NOT_FOUND"

        client.load_model("nobatch")
        assert client.is_model_ready("nobatch")
        assert ready_names(client) == {"simple", "nobatch"}

        # A config override replaces config.pbtxt; the rest is auto-completed.
        client.load_model("simple", config=json.dumps({"max_batch_size": 4}))
        config = client.get_model_config("simple").config
        assert config.max_batch_size == 4
        assert [i.name for i in config.input] == ["INPUT0", "INPUT1"]
        # Replaced, not merged: config.pbtxt's dynamic_batching is gone (docs say so).
        assert not config.HasField("dynamic_batching")
        error = status_of(lambda: client.infer("simple", simple_inputs(rows=5)))
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "max_batch_size (4)" in (error.message() or "")
        client.load_model("simple")  # back to config.pbtxt
        assert client.get_model_config("simple").config.max_batch_size == 8
        client.infer("simple", simple_inputs(rows=5))

        # A model that exists only in the request.
        onnx = (model_repository / "versioned" / "2" / "model.onnx").read_bytes()
        client.load_model(
            "uploaded",
            config=json.dumps({"max_batch_size": 8}),
            files={"file:1/model.onnx": onnx},
        )
        assert client.is_model_ready("uploaded")
        np.testing.assert_array_equal(versioned_output(client, "uploaded"), 2)

        client.unload_model("uploaded")
        assert not client.is_model_ready("uploaded")
        error = status_of(lambda: versioned_output(client, "uploaded"))
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert index_of(client)["uploaded"].state == "UNAVAILABLE"

        client.unload_model("nobatch")
        assert not client.is_model_ready("nobatch")
        assert client.is_model_ready("simple")


def test_explicit_mode_load_errors(start_server: StartServer, model_repository: Path) -> None:
    proc = start_server(model_repository, "--model-control-mode", "explicit")
    with tc.InferenceServerClient(proc.url) as client:
        assert ready_names(client) == set()
        cases: list[tuple[Callable[[], object], str, list[str]]] = [
            (lambda: client.load_model("no_such_model"), "NOT_FOUND", ["no_such_model"]),
            (lambda: client.unload_model("no_such_model"), "NOT_FOUND", ["no_such_model"]),
            (lambda: client.load_model("broken"), "INVALID_ARGUMENT", ["broken", "model.onnx"]),
            (
                lambda: client.load_model("simple", config="{not json"),
                "INVALID_ARGUMENT",
                ["simple", "JSON"],
            ),
            (
                lambda: client.load_model("up", files={"file:1/model.onnx": b"x"}),
                "INVALID_ARGUMENT",
                ["config"],
            ),
            (
                lambda: client.load_model(
                    "up", config="{}", files={"file:../escape/model.onnx": b"x"}
                ),
                "INVALID_ARGUMENT",
                ["../escape/model.onnx"],
            ),
        ]
        for call, code, fragments in cases:
            error = status_of(call)
            assert error.status() == f"StatusCode.{code}", error.message()
            for fragment in fragments:
                assert fragment in (error.message() or ""), error.message()
        assert index_of(client)["broken"].state == "UNAVAILABLE"
        client.load_model("nobatch")
        assert client.is_model_ready("nobatch")


def test_explicit_load_updates_health(start_server: StartServer, model_repository: Path) -> None:
    proc = start_server(
        model_repository,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "simple",
        "--strict-readiness",
    )
    with grpc.insecure_channel(proc.url) as channel, tc.InferenceServerClient(proc.url) as client:
        health = health_pb2_grpc.HealthStub(channel)

        def check(service: str) -> int:
            return int(health.Check(health_pb2.HealthCheckRequest(service=service)).status)

        assert check("simple") == SERVING
        client.load_model("nobatch")
        assert check("nobatch") == SERVING
        client.unload_model("nobatch")
        assert check("nobatch") == NOT_SERVING
        assert check("simple") == SERVING
        # A model unloaded on purpose does not make a strict server unready.
        assert check("") == SERVING
        assert client.is_server_ready()


# --- a single .onnx file, no repository ----------------------------------------------------


@pytest.fixture
def single_file_server(model_repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    model = tmp_path / "relu.onnx"
    shutil.copy(model_repository / "autocomplete" / "1" / "model.onnx", model)
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path / "server.log"
    args = [
        sys.executable, "-m", "lockgate", "serve", str(model),
        "--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", str(metrics_port),
        "--default-max-batch-size", "2",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    proc = ServerProcess(process, port, metrics_port, log_path, args)
    try:
        wait_ready(proc.url, process)
        yield proc
    finally:
        proc.stop()


def test_serve_single_onnx_file(single_file_server: ServerProcess) -> None:
    with tc.InferenceServerClient(single_file_server.url) as client:
        assert [(m.name, m.version) for m in client.get_model_repository_index().models] == [
            ("relu", "1")
        ]
        config = client.get_model_config("relu").config
        assert config.max_batch_size == 2  # from --default-max-batch-size
        assert [(i.name, list(i.dims)) for i in config.input] == [("x", [8])]
        data = np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)
        tensor = tc.InferInput("x", [2, 8], "FP32")
        tensor.set_data_from_numpy(data)
        out = client.infer("relu", [tensor]).as_numpy("y")
        assert out is not None
        np.testing.assert_array_equal(out, np.maximum(data, 0))


# --- paths that do not exist, empty repositories ------------------------------------------


def serve_and_wait(*paths: str) -> subprocess.CompletedProcess[str]:
    """``lockgate serve PATHS`` expected to refuse to start: its exit status and output."""
    args = [sys.executable, "-m", "lockgate", "serve", *paths, "--host", "127.0.0.1"]
    args += ["--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["nope.onnx"], "model file nope.onnx does not exist"),
        (["--model-repository", "/nonexistent/repo"], "model repository /nonexistent/repo does "),
    ],
    ids=["single-file", "repository"],
)
def test_missing_model_path_stops_the_server(paths: list[str], message: str) -> None:
    """A mistyped path must not serve nothing and look like success."""
    done = serve_and_wait(*paths)
    assert done.returncode != 0, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_path_neither_repository_nor_onnx_stops_the_server(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"\0")
    done = serve_and_wait(str(weights))
    assert done.returncode != 0
    assert f"{weights} is neither a model repository (a directory) nor an .onnx file" in (
        done.stderr
    )


def test_empty_repository_warns(start_server: StartServer, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = start_server(empty)
    with tc.InferenceServerClient(server.url) as client:
        assert client.get_model_repository_index().models == []
    assert f"model repository {empty} is empty" in server.log()
