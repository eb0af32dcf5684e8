"""numpy arrays ⇄ KServe v2 wire tensors, for every datatype.

Requests always go out in ``raw_input_contents`` (the compact encoding, and
the one tritonclient uses); replies are read from ``raw_output_contents``,
falling back to the typed ``contents`` fields for servers that answer that way.

Conventions (see ``docs/sdk.md``):

* ``str``/``bytes``/``object`` arrays are ``BYTES``; ``str`` is sent as UTF-8.
  Received ``BYTES`` decode to ``object`` arrays of ``bytes``.
* ``BF16`` is sent from an ``ml_dtypes.bfloat16`` array, or from any numeric
  array with the datatype override ``"BF16"`` (rounded to nearest even).
  Received ``BF16`` decodes to ``float32`` (exact).
* A datatype override casts the array when the cast keeps its kind
  (``int64`` → ``INT32`` is allowed, ``float`` → ``INT32`` is not).
* Decoded fixed-size outputs are read-only views over the reply's bytes (no
  copy); call ``.copy()`` to modify one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._shm import SharedOutput, SharedTensor
from lockgate_client.datatypes import (
    CONTENTS_FIELD,
    WIRE_DTYPES,
    BytesFormatError,
    bf16_to_float32,
    datatype_of,
    deserialize_bytes,
    float32_to_bf16,
    serialize_bytes,
)
from lockgate_client.errors import ProtocolError

__all__ = ["decode_outputs", "decode_tensor", "encode_inputs", "encode_tensor"]

#: Anything ``numpy.asarray`` accepts: arrays, lists, scalars, strings.
ArrayLike = Any

_TEXT_TYPES = (str, bytes)


def encode_tensor(value: ArrayLike, datatype: str | None = None) -> tuple[str, list[int], bytes]:
    """Encode one tensor as ``(datatype, shape, raw bytes)``.

    ``datatype`` overrides the datatype inferred from the array's dtype.
    Raises TypeError when the array cannot be sent as that datatype.
    """
    array = np.asarray(value)
    if datatype is None:
        datatype = datatype_of(array)
    elif datatype not in WIRE_DTYPES:
        raise TypeError(f"unknown datatype {datatype!r}; expected one of {sorted(WIRE_DTYPES)}")
    shape = list(array.shape)
    if datatype == "BYTES":
        return datatype, shape, serialize_bytes(_text_elements(array))
    if datatype == "BF16":
        return datatype, shape, _bf16_bits(array).tobytes()
    if array.dtype.kind in "OSU":
        raise TypeError(f"cannot send a {array.dtype} array as {datatype}")
    wire = WIRE_DTYPES[datatype]
    if array.dtype != wire:
        if not np.can_cast(array.dtype, wire, casting="same_kind"):
            raise TypeError(f"cannot send a {array.dtype} array as {datatype} without losing kind")
        array = array.astype(wire)
    # tobytes() is the one copy (in C order, whatever the strides): protobuf
    # bytes fields accept nothing but bytes.
    return datatype, shape, array.tobytes()


def _text_elements(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Return ``array`` with every element ``str`` or ``bytes``.

    Like tritonclient, other objects in an ``object`` array are sent as their
    ``str()``; numeric arrays must be converted by the caller.
    """
    if array.dtype.kind in "SU":
        return array
    if array.dtype.kind != "O":
        raise TypeError(f"cannot send a {array.dtype} array as BYTES; convert it to str first")
    flat = array.reshape(-1)
    if all(isinstance(item, _TEXT_TYPES) for item in flat):
        return array
    converted = np.empty(flat.shape, dtype=np.object_)
    for i, item in enumerate(flat):
        converted[i] = item if isinstance(item, _TEXT_TYPES) else str(item)
    return converted


def _bf16_bits(array: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    if array.dtype.name == "bfloat16":  # ml_dtypes: its bits are already the wire form
        return np.ascontiguousarray(array).view("<u2")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"cannot send a {array.dtype} array as BF16")
    return float32_to_bf16(array.astype(np.float32, copy=False))


def encode_inputs(
    request: pb.ModelInferRequest,
    inputs: Mapping[str, ArrayLike],
    datatypes: Mapping[str, str] | None = None,
) -> None:
    """Append ``inputs`` to ``request`` as raw input tensors."""
    if not isinstance(inputs, Mapping):
        raise TypeError(
            "inputs must map each input's name to its array, e.g. "
            f'{{"INPUT0": array}}, not a {type(inputs).__name__}'
        )
    overrides = datatypes or {}
    unknown = set(overrides) - set(inputs)
    if unknown:
        raise ValueError(f"datatypes given for inputs not sent: {sorted(unknown)}")
    for name, value in inputs.items():
        if isinstance(value, SharedTensor):
            _add_shared_input(request, name, value, overrides.get(name))
            continue
        if not isinstance(name, str):
            raise TypeError(f"input names must be str, not {type(name).__name__} ({name!r})")
        try:
            datatype, shape, raw = encode_tensor(value, overrides.get(name))
        except TypeError as exc:
            raise TypeError(f"input {name!r}: {exc}") from None
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)


def _add_shared_input(
    request: pb.ModelInferRequest, name: str, tensor: SharedTensor, datatype: str | None
) -> None:
    """An input that lies in a registered region: its reference, no bytes.

    The parameters are Triton's (what tritonclient's ``set_shared_memory``
    sends); raw_input_contents holds entries for inline inputs only.
    """
    if datatype is not None and datatype != tensor.datatype:
        raise TypeError(f"input {name!r} was written as {tensor.datatype}, not {datatype}")
    entry = request.inputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
    set_placement(entry.parameters, tensor.region.name, tensor.offset, tensor.byte_size)


def set_placement(parameters: Any, region: str, offset: int, byte_size: int) -> None:
    """Triton's shared-memory tensor parameters (offset only when not 0, as tritonclient)."""
    parameters["shared_memory_region"].string_param = region
    parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        parameters["shared_memory_offset"].int64_param = offset


def decode_tensor(datatype: str, shape: Sequence[int], raw: bytes) -> npt.NDArray[Any]:
    """Decode one raw tensor; raises ProtocolError if its size does not match."""
    count = math.prod(shape)
    if datatype == "BYTES":
        try:
            return deserialize_bytes(raw, count).reshape(shape)
        except BytesFormatError as exc:
            raise ProtocolError(str(exc)) from None
    wire = WIRE_DTYPES.get(datatype)
    if wire is None:
        raise ProtocolError(f"unknown datatype {datatype!r} in reply")
    if len(raw) != count * wire.itemsize:
        raise ProtocolError(
            f"{datatype} tensor of shape {list(shape)} needs {count * wire.itemsize} bytes, "
            f"got {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=wire).reshape(shape)
    if datatype == "BF16":
        return bf16_to_float32(array)
    return array


def _decode_typed(output: pb.ModelInferResponse.InferOutputTensor) -> npt.NDArray[Any]:
    """Decode an output that came in the typed ``contents`` fields (not raw)."""
    field = CONTENTS_FIELD.get(output.datatype)
    if field is None:
        raise ProtocolError(f"{output.datatype} output {output.name!r} sent without raw contents")
    values = list(getattr(output.contents, field))
    if output.datatype == "BYTES":
        array = np.empty(len(values), dtype=np.object_)
        array[:] = values
    else:
        array = np.array(values, dtype=WIRE_DTYPES[output.datatype])
    if array.size != math.prod(output.shape):
        raise ProtocolError(
            f"output {output.name!r} of shape {list(output.shape)} has {array.size} values"
        )
    return array.reshape(tuple(output.shape))


def decode_outputs(
    response: pb.ModelInferResponse, shared: Mapping[str, SharedOutput] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """Decode every output of ``response`` into ``{name: array}``, in reply order.

    Outputs named in ``shared`` were written into their region by the server
    (their raw entry is empty): they are read from there.
    """
    # Each index into a repeated bytes field copies it: read the list once.
    raw = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise ProtocolError(f"{len(response.outputs)} outputs but {len(raw)} raw contents")
    result: dict[str, npt.NDArray[Any]] = {}
    for i, output in enumerate(response.outputs):
        place = shared.get(output.name) if shared else None
        if place is not None:
            result[output.name] = place.region.read(output.datatype, output.shape, place.offset)
        elif raw:
            result[output.name] = decode_tensor(output.datatype, output.shape, raw[i])
        else:
            result[output.name] = _decode_typed(output)
    return result
