"""Wire tensors to numpy and back, with every check a request must pass.

Decoding validates against the model's precomputed ``TensorSpec``s and
returns numpy views over the request's own bytes where it can (raw fixed-size
tensors are never copied). Encoding always answers in
``raw_output_contents``: tritonclient decodes outputs only from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np

from lockgate import shm
from lockgate.errors import InvalidInputError, UnsupportedError, clip
from lockgate.request import Array, InferRequest
from lockgate.shm import Lease, Placement, Region, SharedMemoryRegistry
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client.datatypes import (
    CONTENTS_FIELD,
    WIRE_DTYPES,
    BytesFormatError,
    deserialize_bytes,
    serialize_bytes,
)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output, precomputed at load for the hot path."""

    name: str
    #: KServe datatype string ("FP32", "BYTES", ...).
    datatype: str
    #: Shape without the batch dimension; -1 is variable.
    dims: tuple[int, ...]
    optional: bool = False
    #: No variable dimension: a request's shape is checked by one comparison.
    fixed: bool = dataclass_field(init=False, default=False)
    #: Elements in one row (the product of ``dims``).
    row_elements: int = dataclass_field(init=False, default=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fixed", all(d >= 0 for d in self.dims))
        object.__setattr__(self, "row_elements", math.prod(self.dims))

    @property
    def dtype(self) -> np.dtype[Any]:
        return WIRE_DTYPES[self.datatype]


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request limits that protect the server's memory."""

    max_batch_size: int
    max_elements: int = 2**28
    max_bytes_element: int = 64 * 2**20
    #: Most elements one BYTES input may hold: each becomes a Python object
    #: (~60 bytes) however short it is on the wire (4 bytes).
    max_bytes_elements: int = 2**20


# Integer ranges for typed contents narrower than their protobuf field.
_INT_RANGES = {
    name: (int(np.iinfo(dt).min), int(np.iinfo(dt).max))  # type: ignore[type-var]
    for name, dt in WIRE_DTYPES.items()
    if dt.kind in "iu"
}


def decode_request(
    request: pb.ModelInferRequest,
    inputs: dict[str, TensorSpec],
    output_names: frozenset[str],
    limits: Limits,
    shared_memory: SharedMemoryRegistry | None = None,
) -> InferRequest:
    """Validate ``request`` against the model and build an ``InferRequest``.

    Inputs placed in shared memory become views of their region; the regions
    the request names are leased (``InferRequest.lease``) until the caller
    releases them, after the response is built.
    """
    # upb builds a new Python object on every field access: read each once.
    tensors = request.inputs
    if len(tensors) > len(inputs):
        # Before iterating: millions of empty entries must cost nothing.
        raise InvalidInputError(
            f"the request has {len(tensors)} inputs but the model has only {len(inputs)}"
        )
    placements: list[Placement | None] | None = None
    for index, tensor in enumerate(tensors):
        if tensor.parameters:
            placement = _placement(tensor.name, "input", tensor.parameters, shared_memory)
            if placement is not None:
                placements = placements or [None] * len(tensors)
                placements[index] = placement
    raw = request.raw_input_contents
    inline = len(tensors) - (len(placements) - placements.count(None) if placements else 0)
    if raw and len(raw) != inline:
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries but the request has "
            f"{inline} inputs not in shared memory; send one entry per such input, in order"
        )
    lease = Lease() if placements or (request.outputs and shared_memory is not None) else None
    try:
        decoded = _decode(request, tensors, raw, placements, lease, inputs, limits, shared_memory)
        decoded.outputs, decoded.output_placements = _requested_outputs(
            request, output_names, lease, shared_memory
        )
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    if lease is not None and lease:
        decoded.lease = lease
    return decoded


def _decode(
    request: pb.ModelInferRequest,
    tensors: Any,
    raw: Any,
    placements: list[Placement | None] | None,
    lease: Lease | None,
    inputs: dict[str, TensorSpec],
    limits: Limits,
    shared_memory: SharedMemoryRegistry | None,
) -> InferRequest:
    batched = limits.max_batch_size > 0
    arrays: dict[str, Array] = {}
    rows = 1
    raw_index = 0
    shared_inputs: dict[str, tuple[int, int]] | None = None
    # Names as well as shapes: requests that list inputs in another order, or
    # leave out different optional inputs, must never be merged as equals.
    shape_key: list[tuple[str, tuple[int, ...]]] = []
    for index, tensor in enumerate(tensors):
        name = tensor.name
        spec = inputs.get(name)
        if spec is None:
            raise InvalidInputError(
                f"unexpected input '{clip(name)}': the model's inputs are {sorted(inputs)}"
            )
        if name in arrays:
            raise InvalidInputError(f"input '{name}' is given more than once")
        shape = tuple(tensor.shape)
        # Fast path for the common case, a fixed-shape input with its batch
        # dimension in range; anything else takes the full check and its message.
        if not (
            batched
            and spec.fixed
            and shape[1:] == spec.dims
            and 1 <= shape[0] <= limits.max_batch_size
            and shape[0] * spec.row_elements <= limits.max_elements
            and (
                spec.datatype != "BYTES"
                or shape[0] * spec.row_elements <= limits.max_bytes_elements
            )
        ):
            shape = _check_shape(tensor, spec, limits)
        datatype = tensor.datatype
        if datatype != spec.datatype:
            raise InvalidInputError(
                f"input '{name}' has datatype {clip(datatype) or '(empty)'}, "
                f"expected {spec.datatype}"
            )
        placement = placements[index] if placements else None
        if placement is not None:
            assert lease is not None and shared_memory is not None
            if tensor.HasField("contents"):
                raise InvalidInputError(
                    f"input '{name}' has typed contents and a shared memory region; "
                    "use one or the other"
                )
            region = shared_memory.lease(lease, placement.region, f"input '{name}'")
            array = _from_shared_memory(region, placement, name, datatype, shape, limits)
            if array.base is not None and datatype != "BYTES":  # a view, not a copy
                shared_inputs = shared_inputs or {}
                shared_inputs[name] = (region.id, placement.offset)
        elif raw:
            if tensor.HasField("contents"):
                raise InvalidInputError(
                    f"input '{name}' has typed contents while the request uses "
                    "raw_input_contents; use one or the other"
                )
            array = _from_raw(raw[raw_index], name, datatype, shape, limits)
            raw_index += 1
        else:
            array = _from_contents(tensor, datatype, shape, limits)
        if batched:
            input_rows = shape[0]
            if arrays and input_rows != rows:
                raise InvalidInputError(
                    f"input '{name}' has batch size {input_rows} but an earlier "
                    f"input has {rows}; all inputs must agree"
                )
            rows = input_rows
            shape_key.append((name, shape[1:]))
        else:
            shape_key.append((name, shape))
        arrays[name] = array
    if len(arrays) != len(inputs):
        missing = [n for n, s in inputs.items() if n not in arrays and not s.optional]
        if missing:
            raise InvalidInputError(f"missing required input(s): {', '.join(missing)}")
    decoded = InferRequest(
        inputs=arrays,
        rows=rows,
        outputs=None,
        shape_key=tuple(shape_key),
        request_id=request.id,
        shared_inputs=shared_inputs,
    )
    if request.parameters:
        decoded.priority = _uint_parameter(request, "priority")
        decoded.timeout_us = _uint_parameter(request, "timeout")
        if "sequence_id" in request.parameters:
            decoded.correlation_id = _correlation_id(request)
            decoded.sequence_start = _bool_parameter(request, "sequence_start")
            decoded.sequence_end = _bool_parameter(request, "sequence_end")
    return decoded


def _correlation_id(request: pb.ModelInferRequest) -> int | str:
    """Triton's ``sequence_id``: an unsigned integer, or a string."""
    value = request.parameters["sequence_id"]
    kind = value.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        number = int(getattr(value, kind))
        if number < 0:
            raise InvalidInputError(f"parameter 'sequence_id' must not be negative, got {number}")
        return number
    if kind == "string_param":
        return str(value.string_param)
    raise InvalidInputError(
        f"parameter 'sequence_id' must be an integer or a string, got {kind or 'nothing'}"
    )


def _bool_parameter(request: pb.ModelInferRequest, key: str) -> bool:
    if key not in request.parameters:
        return False
    value = request.parameters[key]
    kind = value.WhichOneof("parameter_choice")
    if kind != "bool_param":
        raise InvalidInputError(f"parameter '{key}' must be a bool, got {kind or 'nothing'}")
    return bool(value.bool_param)


def _uint_parameter(request: pb.ModelInferRequest, key: str) -> int:
    """A non-negative integer request parameter (``priority``, ``timeout`` in µs)."""
    if key not in request.parameters:
        return 0
    value = request.parameters[key]
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInputError(f"parameter '{key}' must be an integer, got {kind or 'nothing'}")
    number = int(getattr(value, kind))
    if number < 0:
        raise InvalidInputError(f"parameter '{key}' must not be negative, got {number}")
    return number


def _check_shape(
    tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec, limits: Limits
) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    batched = limits.max_batch_size > 0
    expected = ((-1,) if batched else ()) + spec.dims
    if len(shape) != len(expected) or any(
        want != -1 and got != want for got, want in zip(shape, expected, strict=True)
    ):
        raise InvalidInputError(
            f"input '{tensor.name}' has shape {clip(str(list(shape)))}, expected "
            f"{list(expected)}" + (" (first dimension is the batch size)" if batched else "")
        )
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input '{tensor.name}' has a negative dimension: {list(shape)}")
    # Each dimension on its own too: with another one 0 the product passes,
    # yet numpy cannot make an array with a dimension this large.
    if any(d > limits.max_elements for d in shape):
        raise InvalidInputError(
            f"input '{tensor.name}' has shape {list(shape)}: a dimension exceeds the "
            f"server's limit of {limits.max_elements} elements"
        )
    if batched and not 1 <= shape[0] <= limits.max_batch_size:
        raise InvalidInputError(
            f"input '{tensor.name}' has batch size {shape[0]}, which is outside "
            f"1..max_batch_size ({limits.max_batch_size})"
        )
    count = math.prod(shape)
    if count > limits.max_elements:
        raise InvalidInputError(
            f"input '{tensor.name}' has {count} elements, more than the "
            f"server's limit of {limits.max_elements}"
        )
    if spec.datatype == "BYTES" and count > limits.max_bytes_elements:
        raise InvalidInputError(
            f"input '{tensor.name}' has {count} BYTES elements, more than the "
            f"server's limit of {limits.max_bytes_elements}"
        )
    return shape


def _from_raw(
    data: bytes,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    limits: Limits,
    source: str = "raw content",
) -> Array:
    count = math.prod(shape)
    if datatype == "BYTES":
        # Each element needs at least its 4-byte length: refuse a shape the
        # payload cannot fill before allocating anything for it.
        if count * 4 > len(data):
            raise InvalidInputError(
                f"input '{name}' has {len(data)} bytes of {source}, too few for "
                f"{count} BYTES elements (shape {list(shape)}; each needs a 4-byte length)"
            )
        try:
            items = deserialize_bytes(data, count)
        except BytesFormatError as exc:
            raise InvalidInputError(f"input '{name}': {exc}") from None
        return _bytes_to_text(items, name, limits).reshape(shape)
    dtype = WIRE_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInputError(
            f"input '{name}' has {len(data)} bytes of {source}, expected {expected} "
            f"({datatype} with shape {list(shape)})"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _from_shared_memory(
    region: Region,
    placement: Placement,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    limits: Limits,
) -> Array:
    """A view of the input in its region (BYTES: parsed from a private copy)."""
    data = region.view(placement.offset, placement.byte_size, f"input '{name}'")
    if datatype == "BYTES":
        # The client may rewrite the region while we parse it: parse a copy,
        # so the lengths checked are the lengths used.
        return _from_raw(data.tobytes(), name, datatype, shape, limits, "shared memory")
    expected = math.prod(shape) * WIRE_DTYPES[datatype].itemsize
    if placement.byte_size != expected:
        raise InvalidInputError(
            f"input '{name}' has shared_memory_byte_size {placement.byte_size}, expected "
            f"{expected} ({datatype} with shape {list(shape)})"
        )
    array = data.view(WIRE_DTYPES[datatype]).reshape(shape)
    # An offset that is no multiple of the item size gives an unaligned view,
    # which ONNX Runtime must not be handed.
    return array if array.flags.aligned else array.copy()


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor,
    datatype: str,
    shape: tuple[int, ...],
    limits: Limits,
) -> Array:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInputError(
            f"input '{tensor.name}': {datatype} has no typed contents field; "
            "send it in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInputError(
            f"input '{tensor.name}' has {len(values)} elements in contents.{field}, "
            f"expected {count} for shape {list(shape)}"
        )
    if datatype == "BYTES":
        items = np.empty(count, dtype=np.object_)
        items[:] = list(values)
        return _bytes_to_text(items, tensor.name, limits).reshape(shape)
    dtype = WIRE_DTYPES[datatype]
    if datatype in _INT_RANGES and count:
        low, high = _INT_RANGES[datatype]
        wide = np.array(values, dtype=np.uint64 if datatype == "UINT64" else np.int64)
        if int(wide.min()) < low or int(wide.max()) > high:
            raise InvalidInputError(
                f"input '{tensor.name}': contents.{field} holds values outside {datatype}'s "
                f"range {low}..{high}"
            )
        return wide.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def _bytes_to_text(items: Array, name: str, limits: Limits) -> Array:
    """ONNX Runtime string tensors take Python str: decode each element as UTF-8."""
    out = np.empty(items.shape, dtype=np.object_)
    for i, item in enumerate(items):
        if len(item) > limits.max_bytes_element:
            raise InvalidInputError(
                f"input '{name}' element {i} is {len(item)} bytes, more than the "
                f"server's limit of {limits.max_bytes_element}"
            )
        try:
            out[i] = item.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"input '{name}' element {i} is not valid UTF-8; ONNX Runtime string "
                "tensors hold text"
            ) from None
    return out


def _requested_outputs(
    request: pb.ModelInferRequest,
    output_names: frozenset[str],
    lease: Lease | None,
    shared_memory: SharedMemoryRegistry | None,
) -> tuple[list[str] | None, dict[str, Placement] | None]:
    """The outputs asked for (None: all), and those to write into shared memory."""
    if not request.outputs:
        return None, None
    if len(request.outputs) > len(output_names):
        # Before iterating: millions of empty entries must cost nothing.
        raise InvalidInputError(
            f"the request asks for {len(request.outputs)} outputs but the model has only "
            f"{len(output_names)}"
        )
    names = [o.name for o in request.outputs]
    for name in names:
        if name not in output_names:
            raise InvalidInputError(
                f"unknown output '{clip(name)}' requested: the model's outputs are "
                f"{sorted(output_names)}"
            )
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InvalidInputError(f"output '{twice}' is requested more than once")
    placements: dict[str, Placement] | None = None
    for output in request.outputs:
        if output.parameters:
            placement = _placement(output.name, "output", output.parameters, shared_memory)
            if placement is not None:
                assert lease is not None and shared_memory is not None
                region = shared_memory.lease(lease, placement.region, f"output '{output.name}'")
                # The range must lie in the region now; the size of the
                # result is checked once it is known.
                region.check_range(placement.offset, placement.byte_size, f"output '{output.name}'")
                placements = placements or {}
                placements[output.name] = placement
    return names, placements


#: Tensor parameters of Triton extensions Lockgate does not implement. Ignoring
#: them would answer something else than what was asked for.
_UNSUPPORTED_PARAMETERS = {
    "classification": "the classification extension is not supported by Lockgate",
}
_REGION = "shared_memory_region"
_BYTE_SIZE = "shared_memory_byte_size"
_OFFSET = "shared_memory_offset"


def _placement(
    name: str, kind: str, parameters: Any, shared_memory: SharedMemoryRegistry | None
) -> Placement | None:
    """Check a tensor's parameters; its shared-memory placement if it has one."""
    # One lookup per key: upb builds a new object on every map access.
    for key, why in _UNSUPPORTED_PARAMETERS.items():
        if key in parameters:
            raise UnsupportedError(f"{kind} '{clip(name)}' has parameter '{key}': {why}")
    region = parameters.get(_REGION)
    byte_size = parameters.get(_BYTE_SIZE)
    offset = parameters.get(_OFFSET)
    if region is None:
        if byte_size is not None or offset is not None:
            key = _BYTE_SIZE if byte_size is not None else _OFFSET
            raise InvalidInputError(
                f"{kind} '{clip(name)}' has parameter '{key}' but no '{_REGION}'"
            )
        return None
    tensor = f"{kind} '{clip(name)}'"
    if shared_memory is None:
        raise UnsupportedError(
            f"{tensor} names a shared memory region, but system shared memory "
            "is off on this server (--shared-memory off); send tensors inline"
        )
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise InvalidInputError(f"{tensor}: '{_REGION}' must be a non-empty string")
    if byte_size is None:
        raise InvalidInputError(f"{tensor} has '{_REGION}' but no '{_BYTE_SIZE}'")
    return Placement(
        region.string_param,
        0 if offset is None else _size_parameter(tensor, offset, _OFFSET),
        _size_parameter(tensor, byte_size, _BYTE_SIZE),
    )


def _size_parameter(tensor: str, value: Any, key: str) -> int:
    choice = value.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidInputError(f"{tensor}: '{key}' must be an integer, got {choice or 'nothing'}")
    number = int(getattr(value, choice))
    if number < 0:
        raise InvalidInputError(f"{tensor}: '{key}' must not be negative, got {number}")
    return number


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: dict[str, Array],
    datatypes: dict[str, str],
    order: list[str],
    shared: tuple[Lease, dict[str, Placement]] | None = None,
) -> pb.ModelInferResponse:
    """Build the response; every tensor goes in ``raw_output_contents``.

    Outputs placed in shared memory are written into their region; their
    raw entry stays empty, as Triton's, so the entries still line up with
    ``outputs`` (tritonclient finds an output's bytes by its position).
    """
    tensors = []
    raws = []
    for name in order:
        array = outputs[name]
        datatype = datatypes[name]
        tensors.append(
            pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=array.shape)
        )
        if shared is not None and name in shared[1]:
            _to_shared_memory(array, datatype, name, *shared)
            raws.append(b"")
        else:
            raws.append(_to_raw(array, datatype))
    return pb.ModelInferResponse(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        outputs=tensors,
        raw_output_contents=raws,
    )


def _to_shared_memory(
    array: Array, datatype: str, name: str, lease: Lease, placements: dict[str, Placement]
) -> None:
    placement = placements[name]
    region = lease.get(placement.region)
    assert region is not None  # leased when the request was decoded
    to_shared_memory(array, datatype, name, region, placement)


def to_shared_memory(
    array: Array, datatype: str, name: str, region: Region, placement: Placement
) -> int:
    """Write output ``name`` into ``region`` at ``placement`` as wire bytes; their count.

    INVALID_ARGUMENT, naming the output, if they do not fit.
    """
    if datatype == "BYTES":
        data = np.frombuffer(serialize_bytes(array), dtype=np.uint8)
    else:
        dtype = WIRE_DTYPES[datatype]
        data = np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8)
    shm.write(region, placement, data, f"output '{name}'")
    return data.nbytes


def _to_raw(array: Array, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(array)
    dtype = WIRE_DTYPES[datatype]
    if array.dtype != dtype:
        array = array.astype(dtype)
    return array.tobytes()
