"""The messages front ends and the engine exchange, as compact msgpack arrays.

Each frame (ipc/channel.py) carries a list of messages: a process sends what one loop
tick produced in one frame, so a busy front end pays one send and one
receive per tick, not per request. Tensors travel as ``TensorRef``s: a
region of the sender's slab, or (when the slab is full, or for BYTES) the
data itself.
"""

from __future__ import annotations

from typing import Any

import msgspec


class TensorRef(msgspec.Struct, array_like=True, omit_defaults=True):
    """One tensor: where its bytes are, and what they are."""

    name: str
    #: numpy dtype string ("<f4"), or "BYTES" for a list of elements in ``data``.
    dtype: str
    shape: tuple[int, ...]
    #: Offset of the bytes in the sender's slab; -1 when ``data`` carries them.
    offset: int = -1
    nbytes: int = 0
    #: Bytes inline (slab full), or the elements of a BYTES tensor.
    data: bytes | list[Any] | None = None
    #: Nonzero: the bytes are in the client's shared-memory region of this id
    #: (the engine's registry), ``offset`` from the region's start. In a
    #: ``Result``, the engine has written them there.
    region: int = 0


# --- front end → engine ----------------------------------------------------------------


class Hello(msgspec.Struct, tag=1, array_like=True):
    """A front end introduces itself: its pid and the slabs it created."""

    slot: int
    pid: int
    #: The front end writes inputs here; the engine reads them.
    inputs_slab: str
    #: The engine writes outputs here; the front end reads them.
    outputs_slab: str


class Infer(msgspec.Struct, tag=2, array_like=True, omit_defaults=True):
    """One decoded, validated inference request."""

    id: int
    model: str
    #: "" for the model's default version: the engine's current one serves it.
    version: str
    inputs: list[TensorRef]
    rows: int
    shape_key: list[tuple[str, tuple[int, ...]]]
    outputs: list[str] | None = None
    request_id: str = ""
    priority: int = 0
    timeout_us: int = 0
    #: time.monotonic() by which the caller stops waiting (one clock per host).
    deadline: float | None = None
    arrival_ns: int = 0
    #: W3C trace parent of the front end's server span: (trace id, span id, flags).
    trace: tuple[bytes, int, int] | None = None
    #: Sequence batching: correlation ID and the start/end flags.
    correlation_id: int | str | None = None
    sequence_start: bool = False
    sequence_end: bool = False
    #: Outputs the engine writes straight into a client's shared-memory
    #: region: name -> (region id, offset, byte size), from the request.
    placed: dict[str, tuple[int, int, int]] | None = None


class Cancel(msgspec.Struct, tag=3, array_like=True):
    """The caller of request ``id`` has gone."""

    id: int


class Release(msgspec.Struct, tag=4, array_like=True):
    """Output regions the front end has encoded and no longer reads."""

    offsets: list[int]


class Failed(msgspec.Struct, tag=5, array_like=True):
    """A request the front end rejected while decoding, for the engine's statistics."""

    model: str
    version: str
    reason: str
    duration_ns: int


class Call(msgspec.Struct, tag=6, array_like=True):
    """A control operation (lookup, statistics, index, load, unload)."""

    id: int
    op: str
    args: list[Any]


# --- engine → front end ----------------------------------------------------------------


class Result(msgspec.Struct, tag=10, array_like=True, omit_defaults=True):
    """Request ``id`` ran: its outputs (in the front end's outputs slab) and timings."""

    id: int
    #: The version that ran it (the default may have changed since the front end looked).
    version: str
    outputs: list[TensorRef]
    dequeue_ns: int = 0
    compute_ns: tuple[int, int, int] = (0, 0, 0)


class Error(msgspec.Struct, tag=11, array_like=True):
    """Request or call ``id`` failed with a LockgateError of kind ``kind``."""

    id: int
    kind: str
    message: str


class Reply(msgspec.Struct, tag=12, array_like=True):
    """Call ``id`` succeeded."""

    id: int
    value: Any


class ModelEntry(msgspec.Struct, array_like=True):
    """A ready model version, as a front end needs it to decode and answer metadata."""

    name: str
    version: str
    #: The effective (completed) ModelConfig, serialized.
    config: bytes


class RegionEntry(msgspec.Struct, array_like=True):
    """A registered system shared-memory region (``SystemSharedMemoryRegister``)."""

    id: int
    name: str
    key: str
    offset: int
    byte_size: int


class Snapshot(msgspec.Struct, tag=13, array_like=True):
    """What the repository looks like now; published whenever it changes."""

    #: Startup loading is over.
    started: bool
    #: Every model the repository knows (for per-model health).
    names: list[str]
    #: Ready versions.
    models: list[ModelEntry]
    #: Model name → the version an unversioned request gets.
    defaults: dict[str, str]
    #: Every known model has a ready version (for strict readiness).
    all_ready: bool
    #: The registered shared-memory regions (front ends mirror them).
    regions: list[RegionEntry] = msgspec.field(default_factory=list)


ToEngine = Hello | Infer | Cancel | Release | Failed | Call
ToFrontend = Result | Error | Reply | Snapshot

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(list[ToEngine])
_to_frontend = msgspec.msgpack.Decoder(list[ToFrontend])


def encode(messages: list[Any]) -> bytes:
    """One frame holding ``messages``."""
    return _encoder.encode(messages)


def decode_to_engine(frame: bytes | memoryview) -> list[ToEngine]:
    return _to_engine.decode(frame)


def decode_to_frontend(frame: bytes | memoryview) -> list[ToFrontend]:
    return _to_frontend.decode(frame)
