"""Lockgate's internal request: numpy views over the wire bytes, no second object model."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

if TYPE_CHECKING:
    from lockgate.shm import Lease, Placement

Array = npt.NDArray[Any]
#: Output name -> array, for one request or one batch.
Outputs = dict[str, Array]


@dataclass(slots=True, eq=False)
class InferRequest:
    """One decoded inference request, as the batcher and runner see it."""

    #: Input name -> array in the dtype ONNX Runtime takes (BYTES as str objects,
    #: BF16 as uint16 bits), first axis the batch axis when the model batches.
    inputs: dict[str, Array]
    #: Rows this request contributes to a batch (1 for non-batching models).
    rows: int
    #: Output names the caller asked for, in order; None means all.
    outputs: list[str] | None
    #: (name, non-batch shape) of each input, in wire order: only requests
    #: with equal keys merge.
    shape_key: tuple[tuple[str, tuple[int, ...]], ...]
    request_id: str = ""
    #: Priority level (1 = highest); 0 means the model's default.
    priority: int = 0
    #: Queue timeout from the request's ``timeout`` parameter (µs), or 0.
    timeout_us: int = 0
    #: time.monotonic() by which the caller stops waiting, or None.
    deadline: float | None = None
    #: time.monotonic_ns() when the request entered the server.
    arrival_ns: int = 0
    #: Resolved by the scheduler with the request's outputs.
    future: asyncio.Future[dict[str, Array]] | None = None
    #: Tracing context and span, when tracing is on (opaque to the core).
    trace: Any = None
    #: Monotonic ns when the request left the queue (set by the scheduler).
    dequeue_ns: int = 0
    #: Position in arrival order (set by the scheduler; used for ordering).
    sequence: int = field(default=0)
    #: Sequence batching: the ``sequence_id`` parameter (None when absent) and
    #: the ``sequence_start``/``sequence_end`` flags.
    correlation_id: int | str | None = None
    sequence_start: bool = False
    sequence_end: bool = False
    #: Compute input/infer/output ns of the batch that served it.
    compute_ns: tuple[int, int, int] = (0, 0, 0)
    #: The shared-memory regions the request uses, held until it is answered.
    lease: Lease | None = None
    #: Inputs that are views of a region: name -> (region id, offset in the region).
    shared_inputs: dict[str, tuple[int, int]] | None = None
    #: Requested outputs to write into shared memory instead of the response.
    output_placements: dict[str, Placement] | None = None
    #: The version that ran it, when not the one it was decoded against: a
    #: front end's request for a model's default version while a new one took over.
    served_version: str = ""
