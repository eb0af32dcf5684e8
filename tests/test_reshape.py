"""Triton's ``reshape``: wire shapes vs the shapes the ONNX model sees.

A real server over a small repository of reshaping models, talked to with
tritonclient; the shape mapping itself is property-tested.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tc
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from support import ServerProcess, launch_server
from tritonclient.utils import InferenceServerException

from lockgate.errors import ModelLoadError
from lockgate.reshape import ShapeMap, check_reshape
from models.build import CONFIG_HEADER, Tensor, model_bytes, write_model

Array = npt.NDArray[Any]


def _double(inp: str, out: str) -> list[Any]:
    two = helper.make_node("Constant", [], ["two"], value=helper.make_tensor("v", 1, [], [2.0]))
    return [two, helper.make_node("Mul", [inp, "two"], [out])]


def _io(kind: str, name: str, dims: list[int], reshape: list[int] | None = None) -> str:
    """One config.pbtxt input/output line."""
    shape = "" if reshape is None else f" reshape {{ shape: {reshape} }}"
    return f'{kind} [ {{ name: "{name}" data_type: TYPE_FP32 dims: {dims}{shape} }} ]\n'


def _config(name: str, max_batch: int, body: str) -> str:
    return (
        CONFIG_HEADER
        + f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch}\n'
        + body
    )


def build_reshape_repository(repo: Path) -> None:
    """Models whose wire shapes differ from their ONNX shapes."""
    flat_in = Tensor("IN", "TYPE_FP32", (12,))
    flat_out = Tensor("OUT", "TYPE_FP32", (12,))
    write_model(
        repo,
        "flat",
        _config(
            "flat",
            8,
            _io("input", "IN", [3, 4], [12])
            + _io("output", "OUT", [2, 6], [12])
            + "dynamic_batching { max_queue_delay_microseconds: 2000 }\n",
        ),
        {1: model_bytes("flat", _double("IN", "OUT"), [flat_in], [flat_out], batched=True)},
    )
    # A variable dimension travels across: wire [-1, 2, 3] is the model's [-1, 6].
    var_in = Tensor("IN", "TYPE_FP32", (-1, 6))
    var_out = Tensor("OUT", "TYPE_FP32", (-1, 6))
    write_model(
        repo,
        "variable",
        _config(
            "variable",
            4,
            _io("input", "IN", [-1, 2, 3], [-1, 6]) + _io("output", "OUT", [-1, 2, 3], [-1, 6]),
        ),
        {1: model_bytes("variable", _double("IN", "OUT"), [var_in], [var_out], batched=True)},
    )
    # A label-style output with only the batch dimension, and no config at all:
    # auto-complete must give it dims [1] and reshape { shape: [] }.
    features = Tensor("FEATURES", "TYPE_FP32", (4,))
    label = Tensor("LABEL", "TYPE_FP32", ())
    nodes = [helper.make_node("ReduceSum", ["FEATURES", "axes"], ["LABEL"], keepdims=0)]
    axes = helper.make_tensor("axes", 7, [1], [1])
    label_model = model_bytes(
        "label", nodes, [features], [label], batched=True, initializers=[axes]
    )
    write_model(repo, "label", None, {1: label_model})
    # The same model with the config.pbtxt Triton writes for it.
    write_model(
        repo,
        "label_triton",
        _config(
            "label_triton",
            4,
            _io("input", "FEATURES", [4]) + _io("output", "LABEL", [1], []),
        ),
        {1: label_model},
    )
    # Without a batch dimension: wire [2, 2] is the model's [4].
    nb_in = Tensor("IN", "TYPE_FP32", (4,))
    nb_out = Tensor("OUT", "TYPE_FP32", (4,))
    write_model(
        repo,
        "nobatch_reshape",
        _config(
            "nobatch_reshape",
            0,
            _io("input", "IN", [2, 2], [4]) + _io("output", "OUT", [4, 1], [4]),
        ),
        {1: model_bytes("nobatch_reshape", _double("IN", "OUT"), [nb_in], [nb_out], batched=False)},
    )
    # Refused at load: 3 x 4 elements cannot be the model's 10.
    bad_in = Tensor("IN", "TYPE_FP32", (10,))
    write_model(
        repo,
        "bad_count",
        _config(
            "bad_count",
            8,
            _io("input", "IN", [3, 4], [10]) + _io("output", "OUT", [10]),
        ),
        {
            1: model_bytes(
                "bad_count",
                _double("IN", "OUT"),
                [bad_in],
                [Tensor("OUT", "TYPE_FP32", (10,))],
                batched=True,
            )
        },
    )
    # Refused at load: the reshape is not the ONNX model's shape.
    write_model(
        repo,
        "bad_model_shape",
        _config(
            "bad_model_shape",
            8,
            _io("input", "IN", [12], [3, 4]),
        ),
        {
            1: model_bytes(
                "bad_model_shape", _double("IN", "OUT"), [flat_in], [flat_out], batched=True
            )
        },
    )


@pytest.fixture(scope="module")
def reshape_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("reshape-repo")
    build_reshape_repository(repo)
    proc = launch_server(repo, tmp_path_factory.mktemp("reshape-logs"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(reshape_server: ServerProcess) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(reshape_server.url) as triton:
        yield triton


def _infer(client: tc.InferenceServerClient, model: str, name: str, data: Array) -> Array:
    tensor = tc.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    output = "LABEL" if model.startswith("label") else "OUT"
    out: Array | None = client.infer(model, [tensor]).as_numpy(output)
    assert out is not None
    return out


def test_wire_shapes_in_and_out(client: tc.InferenceServerClient) -> None:
    data = np.arange(2 * 12, dtype=np.float32).reshape(2, 3, 4)
    out = _infer(client, "flat", "IN", data)
    assert out.shape == (2, 2, 6)
    np.testing.assert_array_equal(out, (data * 2).reshape(2, 2, 6))


def test_metadata_and_config_show_the_wire_dims(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("flat")
    assert list(meta.inputs[0].shape) == [-1, 3, 4]
    assert list(meta.outputs[0].shape) == [-1, 2, 6]
    config = client.get_model_config("flat").config
    assert list(config.input[0].reshape.shape) == [12]
    assert list(config.output[0].dims) == [2, 6]


def test_a_wrong_wire_shape_is_refused(client: tc.InferenceServerClient) -> None:
    # The model's own shape is not what clients send when a reshape is configured.
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "flat", "IN", np.zeros((1, 12), np.float32))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "expected [-1, 3, 4]" in str(info.value.message())


def test_concurrent_requests_batch_through_the_reshape(
    reshape_server: ServerProcess, client: tc.InferenceServerClient
) -> None:
    def one(i: int) -> None:
        with tc.InferenceServerClient(reshape_server.url) as own:
            data = np.full((1 + i % 3, 3, 4), i, np.float32)
            np.testing.assert_array_equal(
                _infer(own, "flat", "IN", data), (data * 2).reshape(-1, 2, 6)
            )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(24)))
    stats = client.get_inference_statistics("flat").model_stats[0]
    assert stats.inference_count >= sum(1 + i % 3 for i in range(24))


def test_variable_dimensions_map_across(client: tc.InferenceServerClient) -> None:
    for length in (1, 5):
        data = np.arange(2 * length * 6, dtype=np.float32).reshape(2, length, 2, 3)
        np.testing.assert_array_equal(_infer(client, "variable", "IN", data), data * 2)


def test_batch_only_output_autocompletes_to_one(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("label").config
    output = config.output[0]
    assert list(output.dims) == [1]
    assert output.HasField("reshape") and list(output.reshape.shape) == []
    meta = client.get_model_metadata("label")
    assert list(meta.outputs[0].shape) == [-1, 1]
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    for model in ("label", "label_triton"):
        out = _infer(client, model, "FEATURES", data)
        assert out.shape == (3, 1)
        np.testing.assert_array_equal(out[:, 0], data.sum(axis=1))


def test_reshape_without_a_batch_dimension(client: tc.InferenceServerClient) -> None:
    data = np.arange(4, dtype=np.float32).reshape(2, 2)
    out = _infer(client, "nobatch_reshape", "IN", data)
    np.testing.assert_array_equal(out, (data * 2).reshape(4, 1))


def test_bad_reshapes_are_refused_at_load(client: tc.InferenceServerClient) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    count = index["bad_count"]
    assert count.state == "UNAVAILABLE"
    assert "IN" in count.reason and "element counts differ" in count.reason
    shape = index["bad_model_shape"]
    assert shape.state == "UNAVAILABLE"
    assert "reshape [3, 4]" in shape.reason and "[12]" in shape.reason
    # The others keep serving.
    assert index["flat"].state == "READY"


# --- the mapping itself ------------------------------------------------------------------


@st.composite
def reshape_pairs(draw: st.DrawFn) -> tuple[list[int], list[int], list[int]]:
    """(dims, reshape, concrete variable sizes) that describe the same data."""
    groups = draw(st.lists(st.integers(1, 24), min_size=1, max_size=3))

    def pattern() -> list[int]:
        dims: list[int] = []
        for i, count in enumerate(groups):
            if i:
                dims.append(-1)
            factors = draw(st.sampled_from(_factorings(count)))
            dims.extend(factors)
        return dims

    sizes = draw(st.lists(st.integers(1, 3), min_size=len(groups) - 1, max_size=len(groups) - 1))
    return pattern(), pattern(), sizes


def _factorings(count: int) -> list[list[int]]:
    options: list[list[int]] = [[count]] if count > 1 else [[], [1]]
    for a in range(2, count):
        if count % a == 0:
            options.append([a, count // a])
    return options


@settings(deadline=None)
@given(reshape_pairs(), st.integers(1, 3))
def test_shape_maps_round_trip(pair: tuple[list[int], list[int], list[int]], rows: int) -> None:
    dims, reshape, sizes = pair
    check_reshape("m", "t", dims, reshape)
    variable = iter(sizes)
    wire = [rows] + [next(variable) if d == -1 else d for d in dims]
    data = np.arange(math.prod(wire), dtype=np.float32).reshape(wire)
    model = ShapeMap.between("t", 1, dims, reshape).apply(data)
    assert len(model.shape) == 1 + len(reshape)
    back = ShapeMap.between("t", 1, reshape, dims).apply(model)
    np.testing.assert_array_equal(back, data)


def test_mismatched_reshapes_are_named() -> None:
    with pytest.raises(ModelLoadError, match="element counts differ"):
        check_reshape("m", "IN", [3, 4], [10])
    with pytest.raises(ModelLoadError, match="variable"):
        check_reshape("m", "IN", [-1, 4], [4])
    with pytest.raises(ModelLoadError, match="element counts differ"):
        check_reshape("m", "IN", [-1, 4], [2, -1])
