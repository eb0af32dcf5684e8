"""The response cache: Triton's ``response_cache``, local and bounded in bytes.

One cache per server (``--response-cache-bytes N`` or Triton's
``--cache-config local,size=N``), shared by the models whose config says
``response_cache { enable: true }``. A key is a digest of the model, its
version, every input (name, datatype, shape, bytes) and the requested
outputs; a hit answers without the batcher or ONNX Runtime. Entries are
copies, so a cached answer never pins a whole batch's output buffers, and the
least recently used ones are evicted once the byte budget is full.

Everything runs on the event loop thread; the metrics thread only reads
integers.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from lockgate.request import Array, InferRequest

Outputs = dict[str, Array]

#: What one entry costs besides its tensors: the key, the dicts, the arrays' headers.
ENTRY_OVERHEAD_BYTES = 256


def parse_cache_config(text: str) -> int:
    """Bytes from Triton's ``--cache-config local,size=N``; ValueError names the problem."""
    name, _, rest = text.partition(",")
    if name.strip() != "local":
        raise ValueError(
            f"--cache-config '{text}': Lockgate has only the 'local' cache (local,size=BYTES)"
        )
    settings = dict(part.partition("=")[::2] for part in rest.split(",") if part)
    unknown = sorted(set(settings) - {"size"})
    if unknown:
        raise ValueError(f"--cache-config '{text}': unknown setting(s) {', '.join(unknown)}")
    if "size" not in settings:
        raise ValueError(f"--cache-config '{text}': give the size, e.g. local,size=1048576")
    try:
        size = int(settings["size"])
    except ValueError:
        raise ValueError(f"--cache-config '{text}': size must be a number of bytes") from None
    if size < 0:
        raise ValueError(f"--cache-config '{text}': size must not be negative")
    return size


def _nbytes(array: Array) -> int:
    if array.dtype == np.object_:
        return sum(len(item) for item in array.flat) + 8 * array.size
    return int(array.nbytes)


@dataclass
class Entry:
    outputs: Outputs
    nbytes: int


class ResponseCache:
    """An LRU map from request digests to output tensors, bounded in bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(model: str, version: str, request: InferRequest) -> bytes:
        """A digest of everything that decides the response."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(f"{model}\0{version}\0".encode())
        for name in sorted(request.inputs):
            array = request.inputs[name]
            digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
            if array.dtype == np.object_:
                for item in array.flat:
                    text = item.encode() if isinstance(item, str) else bytes(item)
                    digest.update(len(text).to_bytes(4, "little"))
                    digest.update(text)
            else:
                digest.update(np.ascontiguousarray(array).data)
        # None (all outputs) differs from any explicit list, even the full one:
        # only the requested tensors are stored.
        digest.update(repr(request.outputs).encode())
        return digest.digest()

    def lookup(self, key: bytes) -> Outputs | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.outputs

    def insert(self, key: bytes, outputs: Outputs) -> None:
        """Store copies of ``outputs``; evict the least recently used to make room."""
        if key in self._entries:
            return
        stored = {name: _frozen_copy(value) for name, value in outputs.items()}
        size = sum(_nbytes(value) for value in stored.values()) + ENTRY_OVERHEAD_BYTES
        if size > self.capacity_bytes:
            return  # would evict everything and still not fit
        while self.used_bytes + size > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.used_bytes -= old.nbytes
            self.evictions += 1
        self._entries[key] = Entry(stored, size)
        self.used_bytes += size


def _frozen_copy(array: Array) -> Array:
    copy = np.array(array, copy=True)
    copy.flags.writeable = False
    return copy
