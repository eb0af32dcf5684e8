"""Triton's ``reshape``: the shape on the wire versus the shape the model sees.

A tensor's ``dims`` are what clients send and receive (after the batch
dimension); its ``reshape { shape }`` is what the ONNX model takes or makes.
Both may hold variable (-1) dimensions; as in Triton, they must have the same
variable dimensions in the same order, and the fixed dimensions between two
variable ones must hold the same number of elements. That makes the mapping
exact: the variable sizes move over in order, and everything else is fixed.

All the work of matching the two shapes is done here at load; per batch a
``ShapeMap`` reads the variable sizes and builds one tuple.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lockgate.errors import ExecutionError, ModelLoadError
from lockgate.request import Array
from lockgate_client._proto import model_config_pb2 as mc


def _groups(shape: Sequence[int]) -> list[int]:
    """Element counts of the fixed runs between variable dimensions."""
    counts = [1]
    for dim in shape:
        if dim == -1:
            counts.append(1)
        else:
            counts[-1] *= dim
    return counts


def check_reshape(model: str, tensor: str, dims: Sequence[int], shape: Sequence[int]) -> None:
    """Raise ModelLoadError unless ``dims`` and ``shape`` describe the same data."""
    if any(d < -1 or d == 0 for d in shape):
        raise ModelLoadError(
            f"model '{model}': tensor '{tensor}' reshape {list(shape)} must hold positive "
            "dimensions or -1"
        )
    if list(dims).count(-1) != list(shape).count(-1):
        raise ModelLoadError(
            f"model '{model}': tensor '{tensor}' has dims {list(dims)} and reshape "
            f"{list(shape)} with different variable (-1) dimensions"
        )
    if _groups(dims) != _groups(shape):
        raise ModelLoadError(
            f"model '{model}': tensor '{tensor}' has dims {list(dims)} "
            f"({_describe(dims)}) but reshape {list(shape)} ({_describe(shape)}): "
            "the element counts differ"
        )


def _describe(shape: Sequence[int]) -> str:
    if -1 in shape:
        return "variable elements"
    return f"{math.prod(shape)} elements"


@dataclass(frozen=True, slots=True)
class ShapeMap:
    """Turns an array shaped by one pattern into the other pattern's shape."""

    name: str
    #: Leading dimensions kept as they are: 1 (the batch) for batching models.
    keep: int
    source: tuple[int, ...]
    target: tuple[int, ...]
    #: Positions of -1 in ``source`` (after ``keep``): where the variable sizes are.
    variable: tuple[int, ...]

    @classmethod
    def between(
        cls, name: str, keep: int, source: Sequence[int], target: Sequence[int]
    ) -> ShapeMap:
        variable = tuple(i for i, d in enumerate(source) if d == -1)
        return cls(name, keep, tuple(source), tuple(target), variable)

    def apply(self, array: Array) -> Array:
        """A view of ``array`` in the target shape."""
        shape = array.shape
        if len(shape) != self.keep + len(self.source):
            raise ExecutionError(
                f"tensor '{self.name}' has shape {list(shape)}, expected "
                f"{self.keep} batch dimension(s) and {list(self.source)}"
            )
        if not self.variable:
            return array.reshape(shape[: self.keep] + self.target)
        sizes = iter(shape[self.keep + i] for i in self.variable)
        target = tuple(next(sizes) if d == -1 else d for d in self.target)
        return array.reshape(shape[: self.keep] + target)


@dataclass(frozen=True, slots=True)
class Reshaper:
    """The reshapes of one model: wire -> model for inputs, model -> wire for outputs."""

    inputs: tuple[ShapeMap, ...]
    outputs: tuple[ShapeMap, ...]

    @classmethod
    def from_config(cls, config: mc.ModelConfig) -> Reshaper | None:
        """None when no tensor is reshaped: the hot path then skips it entirely."""
        keep = 1 if config.max_batch_size > 0 else 0
        inputs = tuple(
            ShapeMap.between(t.name, keep, t.dims, t.reshape.shape)
            for t in config.input
            if t.HasField("reshape")
        )
        outputs = tuple(
            ShapeMap.between(t.name, keep, t.reshape.shape, t.dims)
            for t in config.output
            if t.HasField("reshape")
        )
        if not inputs and not outputs:
            return None
        return cls(inputs, outputs)

    def to_model(self, feeds: dict[str, Array]) -> dict[str, Array]:
        """Inputs as the model takes them (views; the caller's dict is left alone)."""
        feeds = dict(feeds)
        for rule in self.inputs:
            value = feeds.get(rule.name)
            if value is not None:
                feeds[rule.name] = rule.apply(value)
        return feeds

    def to_wire(self, outputs: dict[str, Array]) -> dict[str, Array]:
        """Outputs as clients receive them, in place."""
        for rule in self.outputs:
            value = outputs.get(rule.name)
            if value is not None:
                outputs[rule.name] = rule.apply(value)
        return outputs
