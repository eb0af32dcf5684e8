"""IO binding (lockgate.binding) against plain ``session.run``, on the CPU provider.

The same classes run GPU instances; here they run on the CPU, which ONNX
Runtime's IO binding supports too, so their shape and buffer handling is
tested without a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from lockgate.binding import BINDABLE, BoundRunner, GraphRunner, bindable

Array = npt.NDArray[Any]

ONNX_TYPE = {
    "tensor(bool)": TensorProto.BOOL,
    "tensor(uint8)": TensorProto.UINT8,
    "tensor(uint16)": TensorProto.UINT16,
    "tensor(uint32)": TensorProto.UINT32,
    "tensor(uint64)": TensorProto.UINT64,
    "tensor(int8)": TensorProto.INT8,
    "tensor(int16)": TensorProto.INT16,
    "tensor(int32)": TensorProto.INT32,
    "tensor(int64)": TensorProto.INT64,
    "tensor(float16)": TensorProto.FLOAT16,
    "tensor(float)": TensorProto.FLOAT,
    "tensor(double)": TensorProto.DOUBLE,
}


@functools.cache
def identity_session(ort_type: str, variable_output: bool = True) -> ort.InferenceSession:
    """FIXED = Identity(A) [batch, 3]; VARIABLE = Identity(B) [batch, width] when asked."""
    element = ONNX_TYPE[ort_type]
    inputs = [helper.make_tensor_value_info("A", element, ["batch", 3])]
    outputs = [helper.make_tensor_value_info("FIXED", element, ["batch", 3])]
    nodes = [helper.make_node("Identity", ["A"], ["FIXED"])]
    if variable_output:
        inputs.append(helper.make_tensor_value_info("B", element, ["batch", "width"]))
        outputs.append(helper.make_tensor_value_info("VARIABLE", element, ["batch", "width"]))
        nodes.append(helper.make_node("Identity", ["B"], ["VARIABLE"]))
    graph = helper.make_graph(nodes, "identity", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def values(dtype: np.dtype[Any], shape: tuple[int, ...], seed: int) -> Array:
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 100, shape).astype(dtype)


@settings(max_examples=40, deadline=None)
@given(
    ort_type=st.sampled_from(sorted(BINDABLE)),
    rows=st.integers(1, 9),
    width=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_bound_runs_equal_plain_runs(ort_type: str, rows: int, width: int, seed: int) -> None:
    session = identity_session(ort_type)
    dtype = BINDABLE[ort_type]
    feeds = {"A": values(dtype, (rows, 3), seed), "B": values(dtype, (rows, width), seed + 1)}
    bound = BoundRunner(session).run(feeds)
    plain = session.run(["FIXED", "VARIABLE"], feeds)
    for got, want in zip(bound, plain, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_each_batch_gets_new_output_arrays() -> None:
    # Callers hold views into a batch's outputs while the next batch runs.
    runner = BoundRunner(identity_session("tensor(float)"))
    first = runner.run({"A": np.ones((2, 3), np.float32), "B": np.ones((2, 1), np.float32)})
    runner.run({"A": np.zeros((2, 3), np.float32), "B": np.zeros((2, 1), np.float32)})
    np.testing.assert_array_equal(first[0], np.ones((2, 3), np.float32))


def test_models_with_strings_are_not_bindable() -> None:
    inputs = [helper.make_tensor_value_info("A", TensorProto.STRING, ["batch"])]
    outputs = [helper.make_tensor_value_info("B", TensorProto.STRING, ["batch"])]
    graph = helper.make_graph([helper.make_node("Identity", ["A"], ["B"])], "s", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert not bindable(session)
    assert bindable(identity_session("tensor(float16)"))


def test_graph_runner_keeps_buffers_per_shape_and_copies_results_out() -> None:
    session = identity_session("tensor(float)", variable_output=False)
    runner = GraphRunner(session, "cpu", 0)
    results = []
    for step, rows in enumerate([1, 4, 1, 4, 2, 4]):
        array = np.full((rows, 3), step, np.float32)
        results.append((array, runner.run({"A": array})[0]))
    for sent, got in results:  # earlier results were not overwritten by later batches
        np.testing.assert_array_equal(got, sent)
    assert len(runner._graphs) == 3


def test_graph_runner_refuses_outputs_of_unknown_shape() -> None:
    with pytest.raises(ValueError, match="VARIABLE"):
        GraphRunner(identity_session("tensor(float)"), "cpu", 0)
