"""Running a session through ONNX Runtime's IO binding.

With ``session.run`` ONNX Runtime allocates every output itself and, on a GPU,
copies each input to the device and each output back on its own schedule.
With IO binding the batch's inputs are bound where they lie (host memory, so
the CUDA provider copies each one to the device once for the whole batch) and
each output is bound to a host array allocated here in its final shape, so
ONNX Runtime writes the results straight into the arrays the callers get
views of and allocates nothing per run for them. Outputs whose shape is not
known before the run (a variable dimension besides the batch) are left to
ONNX Runtime and copied out afterwards.

A fresh output array per batch, never a reused one: the callers' results are
views into it, and they may still be encoding when the next batch runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from lockgate.request import Array

#: ONNX Runtime type strings -> numpy dtypes that IO binding can bind directly.
#: Strings and bfloat16 have no such buffer layout; models with them use run().
BINDABLE: dict[str, np.dtype[np.generic]] = {
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
}


def bindable(session: ort.InferenceSession) -> bool:
    """Every tensor of the model has a plain numeric buffer IO binding can take."""
    nodes = session.get_inputs() + session.get_outputs()
    return all(node.type in BINDABLE for node in nodes)


#: An output's shape as known at load: ints, with BATCH where the run's batch goes.
BATCH = -1


def _template(node: Any, batch_symbol: object) -> tuple[int, ...] | None:
    """The output's shape with the batch dimension left open, or None if unknowable.

    A leading symbolic dimension counts as the batch only when it has the same
    name as the first input's (``batch`` in ours, ``batch_size`` or ``N`` from
    exporters): then it is the merged batch's row count for certain.
    """
    dims = list(node.shape or [])
    if dims and batch_symbol is not None and dims[0] == batch_symbol:
        dims[0] = BATCH
    if all(isinstance(d, int) and (d > 0 or (i == 0 and d == BATCH)) for i, d in enumerate(dims)):
        return tuple(dims)
    return None


def _batch_symbol(session: ort.InferenceSession) -> tuple[str | None, str | None]:
    """The first input's name and the symbol of its leading dimension, if symbolic."""
    inputs = session.get_inputs()
    if not inputs or not inputs[0].shape or not isinstance(inputs[0].shape[0], str):
        return None, None
    return inputs[0].name, inputs[0].shape[0]


class BoundRunner:
    """IO-bound runs of one session; one thread at a time (the instance's own)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self._binding = session.io_binding()
        self._batch_input, symbol = _batch_symbol(session)
        # Decided at load, not per run: which outputs get a preallocated array.
        self._outputs = [
            (node.name, BINDABLE[node.type], _template(node, symbol))
            for node in session.get_outputs()
        ]

    def run(self, feeds: dict[str, Array]) -> list[Array]:
        """Run one batch; outputs in the session's output order."""
        binding = self._binding
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        batch = feeds.get(self._batch_input) if self._batch_input else None
        rows: int | None = int(batch.shape[0]) if batch is not None and batch.ndim else None
        arrays: list[Array | None] = []
        for name, dtype, template in self._outputs:
            if template is None or (rows is None and BATCH in template):
                binding.bind_output(name, "cpu")
                arrays.append(None)
                continue
            shape = [rows if d == BATCH and rows is not None else d for d in template]
            array = np.empty(shape, dtype)
            binding.bind_output(name, "cpu", 0, dtype, shape, array.ctypes.data)
            arrays.append(array)
        try:
            self._session.run_with_iobinding(binding)
            if any(a is None for a in arrays):
                produced = binding.get_outputs()
                arrays = [
                    a if a is not None else np.asarray(produced[i].numpy())
                    for i, a in enumerate(arrays)
                ]
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        return [a for a in arrays if a is not None]


class GraphRunner:
    """IO-bound runs for ``enable_cuda_graph``: device buffers at fixed addresses.

    A captured CUDA graph replays with the device addresses it was captured
    with, so every set of input shapes (in practice: every batch size) gets
    its own device-resident input and output buffers, allocated at its first
    run and kept, and its own graph (``gpu_graph_id``, ONNX Runtime 1.18+).
    Inputs are copied into those buffers in place; outputs are copied out to
    new host arrays, since the buffers are reused by the next batch of that
    size. ``device`` "cpu" runs the same buffer handling without a graph (the
    CPU provider ignores ``gpu_graph_id``), which is how CI tests it.
    """

    def __init__(
        self, session: ort.InferenceSession, device: str = "cuda", device_id: int = 0
    ) -> None:
        self._session = session
        self._device = (device, device_id)
        first, symbol = _batch_symbol(session)
        self._batch_input = first or session.get_inputs()[0].name
        self._outputs = [
            (node.name, BINDABLE[node.type], _template(node, symbol))
            for node in session.get_outputs()
        ]
        unknown = [name for name, _, template in self._outputs if template is None]
        if unknown:
            raise ValueError(
                f"enable_cuda_graph needs every output's shape known from the batch size; "
                f"{unknown} have other variable dimensions"
            )
        self._graphs: dict[
            tuple[tuple[str, tuple[int, ...]], ...],
            tuple[ort.IOBinding, dict[str, ort.OrtValue], ort.RunOptions],
        ] = {}

    def run(self, feeds: dict[str, Array]) -> list[Array]:
        """Run one batch: copy inputs in, replay (or capture) its graph, copy outputs out."""
        # By name: callers may list the inputs in any order.
        key = tuple(sorted((name, value.shape) for name, value in feeds.items()))
        binding, inputs, options = self._graphs.get(key) or self._prepare(key, feeds)
        for name, value in feeds.items():
            inputs[name].update_inplace(np.ascontiguousarray(value))
        self._session.run_with_iobinding(binding, options)
        # Copies: a CPU OrtValue's numpy() may be a view of the reused buffer.
        return [np.array(value.numpy(), copy=True) for value in binding.get_outputs()]

    def _prepare(
        self, key: tuple[tuple[str, tuple[int, ...]], ...], feeds: dict[str, Array]
    ) -> tuple[ort.IOBinding, dict[str, ort.OrtValue], ort.RunOptions]:
        batch = feeds[self._batch_input]
        rows = int(batch.shape[0]) if batch.ndim else 0
        binding = self._session.io_binding()
        inputs = {}
        for name, value in feeds.items():
            device = ort.OrtValue.ortvalue_from_shape_and_type(
                list(value.shape), value.dtype, *self._device
            )
            binding.bind_ortvalue_input(name, device)
            inputs[name] = device
        for name, dtype, template in self._outputs:
            assert template is not None  # checked at load
            shape = [rows if d == BATCH else d for d in template]
            device = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, *self._device)
            binding.bind_ortvalue_output(name, device)
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(len(self._graphs) + 1))
        self._graphs[key] = (binding, inputs, options)
        return self._graphs[key]
