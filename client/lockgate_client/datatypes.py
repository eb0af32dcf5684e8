"""KServe v2 tensor datatypes and their numpy and wire representations.

Shared by the SDK and the server so both sides agree byte for byte:

* ``BYTES`` elements travel as a 4-byte little-endian length followed by the
  bytes, concatenated (Triton's raw layout). In numpy they are ``object``
  arrays of ``bytes``.
* ``BF16`` has no numpy dtype. On the wire it is the upper 16 bits of an IEEE
  float32; in numpy Lockgate represents it as ``float32`` (widening is exact,
  narrowing rounds to nearest even). Callers holding ``ml_dtypes.bfloat16``
  arrays may pass them; they are read by their bits.
* Everything else is little-endian, row-major, with no padding.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np
import numpy.typing as npt

#: KServe datatype string -> numpy dtype of its elements (BF16 as stored bits).
WIRE_DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
    "BYTES": np.dtype(np.object_),
}

#: Datatypes whose typed contents field in InferTensorContents holds them.
CONTENTS_FIELD: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

#: Element size in bytes of fixed-size datatypes (BYTES is variable).
ELEMENT_SIZE: Final[dict[str, int]] = {
    name: dt.itemsize for name, dt in WIRE_DTYPES.items() if name != "BYTES"
}

#: Model-config enum names (``TYPE_FP32``) -> KServe datatype strings.
CONFIG_TO_WIRE: Final[dict[str, str]] = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
    "TYPE_BF16": "BF16",
}
WIRE_TO_CONFIG: Final[dict[str, str]] = {v: k for k, v in CONFIG_TO_WIRE.items()}

_LENGTH = struct.Struct("<I")


class BytesFormatError(ValueError):
    """Raised when serialized BYTES content is malformed."""


def datatype_of(array: npt.NDArray[np.generic]) -> str:
    """Return the KServe datatype that represents ``array``'s elements."""
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    if array.dtype.name == "bfloat16":  # ml_dtypes
        return "BF16"
    for name, dtype in WIRE_DTYPES.items():
        if name not in ("BYTES", "BF16") and dtype == array.dtype.newbyteorder("<"):
            return name
    raise TypeError(f"numpy dtype {array.dtype} has no KServe v2 datatype")


def serialize_bytes(array: npt.NDArray[np.generic]) -> bytes:
    """Serialize a BYTES tensor: each element length-prefixed, row-major.

    ``str`` elements are UTF-8 encoded; ``bytes`` are sent as they are; other
    objects (numbers...) as the UTF-8 of ``str(item)``, as tritonclient does
    (``bytes(3)`` would be three zero bytes, never what a caller meant).
    """
    # One growing buffer, not a list of two objects per element: a million
    # short elements would cost ~100 MB of small objects before the join.
    out = bytearray()
    pack = _LENGTH.pack
    for item in array.reshape(-1):
        if isinstance(item, bytes | bytearray | memoryview | np.bytes_):
            data = bytes(item)
        else:
            data = str(item).encode("utf-8")
        out += pack(len(data))
        out += data
    return bytes(out)


def deserialize_bytes(buffer: bytes | memoryview, count: int) -> npt.NDArray[np.object_]:
    """Parse ``count`` length-prefixed elements from ``buffer``.

    Raises BytesFormatError if the buffer is truncated, holds a different
    number of elements, or has bytes left over.
    """
    view = memoryview(buffer)
    if count < 0 or count * 4 > len(view):
        # Checked before allocating: a huge count must not cost memory.
        raise BytesFormatError(
            f"BYTES content of {len(view)} bytes cannot hold {count} elements "
            "(each needs a 4-byte length prefix)"
        )
    out = np.empty(count, dtype=np.object_)
    offset = 0
    end = len(view)
    for i in range(count):
        if offset + 4 > end:
            raise BytesFormatError(
                f"BYTES content ends after {i} of {count} elements (no length prefix)"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise BytesFormatError(
                f"BYTES element {i} declares {length} bytes but only {end - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != end:
        raise BytesFormatError(
            f"BYTES content has {end - offset} bytes left over after {count} elements"
        )
    return out


def bf16_to_float32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """Widen bfloat16 bit patterns to float32 (exact)."""
    return (bits.astype("<u4") << 16).view("<f4")


def float32_to_bf16(values: npt.NDArray[np.floating]) -> npt.NDArray[np.uint16]:
    """Narrow float32 values to bfloat16 bit patterns, rounding to nearest even."""
    as_f32 = np.ascontiguousarray(values, dtype="<f4")
    bits = as_f32.view("<u4")
    rounding = ((bits >> 16) & 1) + 0x7FFF
    narrowed: npt.NDArray[np.uint16] = ((bits + rounding) >> 16).astype("<u2")
    # NaN must stay NaN: rounding could carry a NaN's payload into infinity.
    nan = np.isnan(as_f32)
    if nan.any():
        narrowed[nan] = ((bits[nan] >> 16) | 0x0040).astype("<u2")
    return narrowed
