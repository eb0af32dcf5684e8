"""System shared memory on the client side: regions this process creates and owns.

A :class:`SharedMemoryRegion` is a POSIX shared-memory object (``/dev/shm``)
mapped into this process. Tensors written into it travel to a server on the
same host as a reference (region, offset, size) instead of bytes; outputs the
server writes into it are read back without crossing the socket.

Linux only, like the server side: the object is ``/dev/shm/<key>``.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from lockgate_client.datatypes import (
    WIRE_DTYPES,
    BytesFormatError,
    bf16_to_float32,
    datatype_of,
    deserialize_bytes,
)
from lockgate_client.errors import ProtocolError

__all__ = ["SharedMemoryRegion", "SharedOutput", "SharedTensor"]

_SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class SharedTensor:
    """An input tensor that lies in a region: pass it to ``infer`` in place of an array."""

    region: SharedMemoryRegion
    offset: int
    byte_size: int
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SharedOutput:
    """Room in a region for an output: pass it in ``infer(outputs={name: ...})``."""

    region: SharedMemoryRegion
    offset: int
    byte_size: int


class SharedMemoryRegion:
    """A shared-memory object this process created, to register with a server.

    Create one with ``client.create_shared_memory(name, byte_size)`` (which
    also registers it), or directly and register it with
    ``client.register_shared_memory(region)``. :meth:`write` places an input
    in it; :meth:`output` reserves room for an output; ``infer`` reads such
    outputs back into arrays that are views of the region. :meth:`close`
    unmaps and removes the object (and, when a client registered it through
    ``create_shared_memory``, unregisters it first).

    Args:
        name: the name the server will know the region by.
        byte_size: the object's size in bytes.
        key: the POSIX shared-memory name (default: a fresh ``/lockgate_...``).
    """

    def __init__(self, name: str, byte_size: int, *, key: str | None = None) -> None:
        if byte_size <= 0:
            raise ValueError(f"byte_size must be positive, got {byte_size}")
        self.name = name
        self.byte_size = byte_size
        self.key = key or f"/lockgate_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        path = os.path.join(_SHM_DIR, self.key.lstrip("/"))
        # O_EXCL: never take over (or later unlink) an object someone else made.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self._path = path
        try:
            os.ftruncate(fd, byte_size)
            self._mmap = mmap.mmap(fd, byte_size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self._bytes: npt.NDArray[np.uint8] = np.frombuffer(self._mmap, dtype=np.uint8)
        self._next = 0
        #: Set by ``create_shared_memory``: called by close() to unregister.
        self._on_close: Any = None

    # --- placing tensors ---------------------------------------------------------------

    def write(
        self, value: Any, *, offset: int | None = None, datatype: str | None = None
    ) -> SharedTensor:
        """Copy ``value`` into the region (one copy) and return the input reference.

        ``offset`` defaults to the first 64-byte boundary after the previous
        :meth:`write` or :meth:`output` (call :meth:`reset` to start again at 0). The
        datatype follows the array's dtype, as for ``infer``; ``BYTES`` is
        written in Triton's serialized form (4-byte little-endian lengths).
        """
        from lockgate_client.codec import encode_tensor

        array = np.asarray(value)
        start = self._next if offset is None else offset
        kind = datatype or datatype_of(array)
        wire = WIRE_DTYPES.get(kind)
        if wire is None or kind in ("BYTES", "BF16") or array.dtype.kind in "OSU":
            # Serialized forms (and every refusal, with its message): as inline.
            kind, _, raw = encode_tensor(array, datatype)
            size = len(raw)
            self._slice(start, size)[:] = np.frombuffer(raw, dtype=np.uint8)
        else:
            if not np.can_cast(array.dtype, wire, casting="same_kind"):
                raise TypeError(f"cannot send a {array.dtype} array as {kind} without losing kind")
            size = array.size * wire.itemsize
            # Cast straight into the region: the one copy.
            target = self._slice(start, size).view(wire).reshape(array.shape)
            np.copyto(target, array, casting="same_kind")
        self._next = _aligned(start + size)
        return SharedTensor(self, start, size, kind, tuple(array.shape))

    def output(self, byte_size: int, *, offset: int | None = None) -> SharedOutput:
        """Reserve ``byte_size`` bytes for an output (after the last placement by default)."""
        start = self._next if offset is None else offset
        self._slice(start, byte_size)
        self._next = _aligned(start + byte_size)
        return SharedOutput(self, start, byte_size)

    def reset(self) -> None:
        """Place the next tensor at offset 0 again (earlier references stay valid)."""
        self._next = 0

    def read(self, datatype: str, shape: Sequence[int], offset: int = 0) -> npt.NDArray[Any]:
        """The tensor at ``offset``: a view of the region for fixed-size types.

        ``BYTES`` decodes into an ``object`` array of ``bytes`` (a copy),
        ``BF16`` into ``float32``. A view changes when the region is written
        again, and must not be used after :meth:`close`.
        """
        count = math.prod(shape)
        if datatype == "BYTES":
            try:
                return _bytes_prefix(memoryview(self._bytes[offset:].data), count).reshape(
                    tuple(shape)
                )
            except BytesFormatError as exc:
                raise ProtocolError(str(exc)) from None
        wire = WIRE_DTYPES.get(datatype)
        if wire is None:
            raise ProtocolError(f"unknown datatype {datatype!r}")
        array = self._slice(offset, count * wire.itemsize).view(wire).reshape(tuple(shape))
        return bf16_to_float32(array) if datatype == "BF16" else array

    def _slice(self, offset: int, size: int) -> npt.NDArray[np.uint8]:
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise ValueError(
                f"{size} bytes at offset {offset} do not fit in region {self.name!r} "
                f"of {self.byte_size} bytes"
            )
        return self._bytes[offset : offset + size]

    # --- lifetime --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return not hasattr(self, "_bytes")

    def close(self) -> None:
        """Unregister (if ``create_shared_memory`` registered it), unmap and unlink."""
        if self.closed:
            return
        on_close, self._on_close = self._on_close, None
        try:
            if on_close is not None:
                on_close(self)
        finally:
            del self._bytes
            # BufferError: an output array still views the region; the
            # mapping then goes with the last such view.
            with contextlib.suppress(BufferError):
                self._mmap.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    def __enter__(self) -> SharedMemoryRegion:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SharedMemoryRegion(name={self.name!r}, key={self.key!r}, byte_size={self.byte_size})"
        )


def _aligned(offset: int) -> int:
    """The next 64-byte boundary: every dtype's alignment, and a cache line."""
    return -(-offset // 64) * 64


def _bytes_prefix(view: memoryview, count: int) -> npt.NDArray[np.object_]:
    """``count`` BYTES elements from the start of ``view`` (the rest is unused room)."""
    end = 0
    for _ in range(count):
        if end + 4 > len(view):
            break
        end += 4 + int.from_bytes(view[end : end + 4], "little")
    return deserialize_bytes(view[: min(end, len(view))], count)
