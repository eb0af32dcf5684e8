"""The core RPCs of GRPCInferenceService, as tritonclient's sync client uses them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from support import simple_inputs
from tritonclient.utils import InferenceServerException

#: Every test here runs against a single-process server and one with two front ends.
pytestmark = pytest.mark.frontends(1, 2)

Array = npt.NDArray[Any]


def output(result: tc.InferResult, name: str) -> Array:
    array: Array | None = result.as_numpy(name)
    assert array is not None, f"no output {name}"
    return array


def stats_of(client: tc.InferenceServerClient, model: str) -> Any:
    stats = client.get_inference_statistics(model).model_stats
    assert len(stats) == 1
    return stats[0]


# --- server and model metadata ------------------------------------------------------


def test_server_live_and_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()


def test_server_metadata(client: tc.InferenceServerClient) -> None:
    metadata = client.get_server_metadata()
    assert metadata.name == "lockgate"
    assert metadata.version
    assert {"model_repository", "model_configuration", "statistics"} <= set(metadata.extensions)
    # System shared memory only (on by default); CUDA's is not implemented.
    assert "system_shared_memory" in metadata.extensions
    assert "cuda_shared_memory" not in metadata.extensions


def test_model_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "2")
    assert not client.is_model_ready("broken")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata(client: tc.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("simple")
    assert metadata.name == "simple"
    assert metadata.platform == "onnxruntime_onnx"
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ]
    assert [t.name for t in metadata.outputs] == ["OUTPUT0", "OUTPUT1"]
    nobatch = client.get_model_metadata("nobatch")
    assert [list(t.shape) for t in nobatch.inputs] == [[2, 3]]


def test_model_config(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("simple").config
    assert config.name == "simple"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [i.name for i in config.input] == ["INPUT0", "INPUT1"]
    assert list(config.input[0].dims) == [16]
    assert config.HasField("dynamic_batching")


def test_model_config_autocompleted(client: tc.InferenceServerClient) -> None:
    """``autocomplete`` has no config.pbtxt: everything comes from the ONNX graph."""
    config = client.get_model_config("autocomplete").config
    assert config.name == "autocomplete"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 4  # --default-max-batch-size's default
    assert config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("x", tc.model_config_pb2.TYPE_FP32, [8])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("y", tc.model_config_pb2.TYPE_FP32, [8])
    ]
    assert config.instance_group[0].count == 1
    assert config.version_policy.latest.num_versions == 1


# --- inference ----------------------------------------------------------------------


def test_simple_infer(client: tc.InferenceServerClient) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 5, dtype=np.int32)
    result = client.infer("simple", simple_inputs(a, b))
    np.testing.assert_array_equal(output(result, "OUTPUT0"), a + b)
    np.testing.assert_array_equal(output(result, "OUTPUT1"), a - b)
    response = result.get_response()
    assert response.model_name == "simple"
    assert response.model_version == "1"


def test_request_id_is_echoed(client: tc.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    result = client.infer("simple", simple_inputs(a, a), request_id="req-42 ✓")
    assert result.get_response().id == "req-42 ✓"
    assert client.infer("simple", simple_inputs(a, a)).get_response().id == ""


def test_requested_output_subset(client: tc.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 2, dtype=np.int32)
    result = client.infer(
        "simple", simple_inputs(a, b), outputs=[tc.InferRequestedOutput("OUTPUT1")]
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["OUTPUT1"]
    assert len(response.raw_output_contents) == 1
    np.testing.assert_array_equal(output(result, "OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None


def test_requested_outputs_keep_the_requested_order(client: tc.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    wanted = [tc.InferRequestedOutput("OUTPUT1"), tc.InferRequestedOutput("OUTPUT0")]
    result = client.infer("simple", simple_inputs(a, a), outputs=wanted)
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1", "OUTPUT0"]
    np.testing.assert_array_equal(output(result, "OUTPUT0"), a + a)


def test_nobatch_infer(client: tc.InferenceServerClient) -> None:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = tc.InferInput("INPUT0", [2, 3], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("nobatch", [tensor])
    np.testing.assert_array_equal(output(result, "OUTPUT0"), data * 2)


def test_mlp_matches_onnxruntime(client: tc.InferenceServerClient, model_repository: Path) -> None:
    """The served model computes what ONNX Runtime computes in-process."""
    data = np.random.default_rng(7).standard_normal((3, 512), dtype=np.float32)
    tensor = tc.InferInput("INPUT", [3, 512], "FP32")
    tensor.set_data_from_numpy(data)
    served = output(client.infer("mlp", [tensor]), "OUTPUT")
    session = ort.InferenceSession(
        str(model_repository / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (expected,) = session.run(["OUTPUT"], {"INPUT": data})
    assert served.shape == (3, 512)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)


def test_image_classifier_softmax(client: tc.InferenceServerClient) -> None:
    image = np.random.default_rng(3).random((1, 3, 224, 224), dtype=np.float32)
    tensor = tc.InferInput("INPUT", [1, 3, 224, 224], "FP32")
    tensor.set_data_from_numpy(image)
    probabilities = output(client.infer("image_classifier", [tensor]), "OUTPUT")
    assert probabilities.shape == (1, 1000)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)


def test_64_mib_request(client: tc.InferenceServerClient) -> None:
    """Messages far over gRPC's 4 MiB default go through both ways."""
    size = 64 * 2**20
    data = np.frombuffer(np.random.default_rng(64).bytes(size), dtype=np.uint8).reshape(1, size)
    tensor = tc.InferInput("INPUT0", [1, size], "UINT8")
    tensor.set_data_from_numpy(data)
    result = client.infer("identity_uint8", [tensor], client_timeout=120)
    echoed = output(result, "OUTPUT0")
    assert echoed.shape == (1, size)
    assert echoed.tobytes() == data.tobytes()


def test_unknown_model_is_not_found(client: tc.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("no_such_model", simple_inputs(a, a))
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in info.value.message()


# --- statistics ---------------------------------------------------------------------


def test_statistics_count_known_traffic(client: tc.InferenceServerClient) -> None:
    """Requests, inferences (rows) and executions, as Triton counts them."""
    before = stats_of(client, "simple")
    for rows in (1, 2, 3):
        a = np.ones((rows, 16), dtype=np.int32)
        client.infer("simple", simple_inputs(a, a))
    bad = tc.InferInput("INPUT0", [1, 16], "INT32")
    bad.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    with pytest.raises(InferenceServerException):
        client.infer("simple", [bad])  # INPUT1 missing
    after = stats_of(client, "simple")
    assert after.name == "simple"
    assert after.version == "1"
    assert after.inference_count - before.inference_count == 6
    # Sequential requests: each one is its own execution.
    assert after.execution_count - before.execution_count == 3
    success = after.inference_stats.success
    assert success.count - before.inference_stats.success.count == 3
    assert success.ns > before.inference_stats.success.ns
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == 3
    assert after.last_inference >= before.last_inference > 0
    batch_sizes = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    assert {1, 2, 3} <= set(batch_sizes)


def test_statistics_for_all_models(client: tc.InferenceServerClient) -> None:
    stats = client.get_inference_statistics().model_stats
    names = {s.name for s in stats}
    assert {"simple", "mlp", "versioned", "identity_fp32"} <= names
    assert "broken" not in names
    assert [s.version for s in stats if s.name == "versioned"] == ["3"]


def test_statistics_of_a_version(client: tc.InferenceServerClient) -> None:
    stats = client.get_inference_statistics("versioned", "3").model_stats
    assert [(s.name, s.version) for s in stats] == [("versioned", "3")]
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("versioned", "1")
    assert info.value.status() == "StatusCode.NOT_FOUND"
