"""The sequence batcher: Triton's ``sequence_batching`` for stateful models.

Requests carry a correlation ID (``sequence_id``, integer or string) and the
``sequence_start`` / ``sequence_end`` flags. Per sequence, requests run one
at a time in arrival order; requests of different sequences batch together
through the model's ordinary ``Scheduler`` (both ``direct`` and ``oldest``
map onto it: at most one request per sequence in a batch, batches formed
within the strategy's queue delay and preferred sizes).

Before a request runs, the control inputs the config names are added to it
(``CONTROL_SEQUENCE_START``, ``_READY``, ``_END``, ``_CORRID``), and for
**implicit state** each ``state { input_name output_name }`` input gets the
sequence's state: zeros at the start, afterwards what the model wrote to the
output the last time. State outputs are kept, never sent to the client. A
sequence idle for ``max_sequence_idle_microseconds`` (Triton's default: 1 s)
is released, and later requests for it are told so.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lockgate.batcher import Scheduler
from lockgate.errors import InvalidInputError, ModelLoadError, ModelUnavailableError
from lockgate.request import Array, InferRequest, Outputs
from lockgate_client._proto import model_config_pb2 as mc
from lockgate_client.datatypes import CONFIG_TO_WIRE, WIRE_DTYPES

#: Triton's default for max_sequence_idle_microseconds.
DEFAULT_IDLE_US = 1_000_000
#: How many timed-out correlation IDs are remembered, to say why a request failed.
REMEMBER_TIMED_OUT = 4096

Kind = mc.ModelSequenceBatching.Control
CorrelationId = int | str


@dataclass(frozen=True)
class Control:
    """One control tensor: its input name, kind, dtype and (false, true) values."""

    name: str
    kind: int
    dtype: np.dtype[Any]
    values: tuple[Any, Any]


@dataclass(frozen=True)
class State:
    """One implicit state: model input and output, dtype and per-row dims."""

    input_name: str
    output_name: str
    dtype: np.dtype[Any]
    dims: tuple[int, ...]


def controls_of(config: mc.ModelConfig) -> list[Control]:
    """The control inputs of a ``sequence_batching`` config, checked."""
    name = config.name
    out: list[Control] = []
    for entry in config.sequence_batching.control_input:
        if len(entry.control) != 1:
            raise ModelLoadError(
                f"model '{name}': control input '{entry.name}' must have exactly one control"
            )
        control = entry.control[0]
        kind = control.kind
        if kind == Kind.CONTROL_SEQUENCE_CORRID:
            if control.data_type == mc.TYPE_INVALID:
                raise ModelLoadError(
                    f"model '{name}': CONTROL_SEQUENCE_CORRID input '{entry.name}' needs a "
                    "data_type (TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32, TYPE_STRING)"
                )
            dtype = _dtype(name, entry.name, control.data_type)
            out.append(Control(entry.name, kind, dtype, (0, 0)))
            continue
        pairs: list[tuple[list[Any], np.dtype[Any]]] = [
            (list(control.int32_false_true), np.dtype(np.int32)),
            (list(control.fp32_false_true), np.dtype(np.float32)),
            (list(control.bool_false_true), np.dtype(np.bool_)),
        ]
        given = [(values, dtype) for values, dtype in pairs if values]
        if len(given) != 1 or len(given[0][0]) != 2:
            raise ModelLoadError(
                f"model '{name}': control input '{entry.name}' needs one of int32_false_true, "
                "fp32_false_true or bool_false_true with two values (false, true)"
            )
        values, dtype = given[0]
        out.append(Control(entry.name, kind, dtype, (values[0], values[1])))
    return out


def states_of(config: mc.ModelConfig) -> list[State]:
    """The implicit states of a ``sequence_batching`` config, checked."""
    name = config.name
    out: list[State] = []
    for state in config.sequence_batching.state:
        if not state.input_name or not state.output_name:
            raise ModelLoadError(f"model '{name}': a state needs both input_name and output_name")
        if any(d <= 0 for d in state.dims) or not state.dims:
            raise ModelLoadError(
                f"model '{name}': state '{state.input_name}' needs fixed positive dims, "
                f"got {list(state.dims)}"
            )
        for initial in state.initial_state:
            if initial.WhichOneof("state_data") == "data_file":
                raise ModelLoadError(
                    f"model '{name}': state '{state.input_name}': initial_state data_file is "
                    "not supported; use zero_data"
                )
        dtype = _dtype(name, state.input_name, state.data_type)
        out.append(State(state.input_name, state.output_name, dtype, tuple(state.dims)))
    return out


def _dtype(model: str, tensor: str, data_type: int) -> np.dtype[Any]:
    wire = CONFIG_TO_WIRE.get(mc.DataType.Name(data_type)) if data_type else None
    if wire is None:
        raise ModelLoadError(f"model '{model}': tensor '{tensor}' needs a data_type")
    return WIRE_DTYPES[wire]


def hidden_tensors(config: mc.ModelConfig) -> tuple[set[str], set[str]]:
    """ONNX inputs and outputs the server feeds and keeps itself (controls, states)."""
    batching = config.sequence_batching
    inputs = {c.name for c in batching.control_input} | {s.input_name for s in batching.state}
    outputs = {s.output_name for s in batching.state}
    return inputs, outputs


def batching_view(config: mc.ModelConfig) -> mc.ModelConfig:
    """The config the inner Scheduler sees: the strategy as dynamic batching."""
    view = mc.ModelConfig()
    view.CopyFrom(config)
    strategy = config.sequence_batching
    view.dynamic_batching.SetInParent()  # replaces sequence_batching in the oneof
    if config.max_batch_size <= 1:
        return view
    if strategy.WhichOneof("strategy_choice") == "oldest":
        view.dynamic_batching.max_queue_delay_microseconds = (
            strategy.oldest.max_queue_delay_microseconds
        )
        view.dynamic_batching.preferred_batch_size.extend(strategy.oldest.preferred_batch_size)
        view.dynamic_batching.preserve_ordering = strategy.oldest.preserve_ordering
    else:
        view.dynamic_batching.max_queue_delay_microseconds = (
            strategy.direct.max_queue_delay_microseconds
        )
    return view


@dataclass(eq=False)
class Sequence:
    """One live sequence: its turn-taking lock, state and idle timer."""

    correlation_id: CorrelationId
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: dict[str, Array] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    #: Requests queued or running for it: it is not idle while any are.
    active: int = 0


class SequenceScheduler:
    """Runs a stateful model's requests sequence by sequence, through its batcher."""

    def __init__(self, config: mc.ModelConfig, batcher: Scheduler) -> None:
        self._name = config.name
        self._batcher = batcher
        self._batched = config.max_batch_size > 0
        self._controls = controls_of(config)
        self._states = states_of(config)
        self._state_outputs = {s.output_name for s in self._states}
        idle_us = config.sequence_batching.max_sequence_idle_microseconds or DEFAULT_IDLE_US
        self._idle_s = idle_us * 1e-6
        self._sequences: dict[CorrelationId, Sequence] = {}
        self._timed_out: OrderedDict[CorrelationId, None] = OrderedDict()
        self.max_rows = batcher.max_rows
        self._closed = False

    # The batcher's view of the queue is the model's.
    @property
    def queued(self) -> int:
        return self._batcher.queued

    @property
    def pending(self) -> int:
        return self._batcher.pending

    @property
    def busy(self) -> bool:
        return self._batcher.busy or any(s.active for s in self._sequences.values())

    @property
    def live_sequences(self) -> int:
        return len(self._sequences)

    async def run(self, request: InferRequest) -> Outputs:
        """Run ``request`` in its sequence's turn; the client's outputs."""
        if self._closed:
            raise ModelUnavailableError("model is unloading; no new requests accepted")
        sequence = self._sequence_for(request)
        sequence.active += 1
        if sequence.timer is not None:
            sequence.timer.cancel()
            sequence.timer = None
        try:
            async with sequence.lock:
                if self._sequences.get(sequence.correlation_id) is not sequence:
                    raise InvalidInputError(
                        f"sequence {sequence.correlation_id!r} ended before this request ran; "
                        "start a new one with sequence_start"
                    )
                return await self._run_turn(sequence, request)
        finally:
            sequence.active -= 1
            self._after(sequence, request)

    def _sequence_for(self, request: InferRequest) -> Sequence:
        correlation_id = request.correlation_id
        if correlation_id is None or correlation_id in (0, ""):
            raise InvalidInputError(
                f"inference request to model '{self._name}' must specify a non-zero or "
                "non-empty correlation ID (the sequence_id parameter)"
            )
        if self._batched and request.rows != 1:
            raise InvalidInputError(
                f"requests to the sequence model '{self._name}' must have batch size 1, "
                f"got {request.rows}"
            )
        sequence = self._sequences.get(correlation_id)
        if request.sequence_start:
            if sequence is None or sequence.active == 0:
                sequence = Sequence(correlation_id)
                self._sequences[correlation_id] = sequence
                self._timed_out.pop(correlation_id, None)
            return sequence
        if sequence is not None:
            return sequence
        if correlation_id in self._timed_out:
            raise InvalidInputError(
                f"sequence {correlation_id!r} of model '{self._name}' timed out: no request "
                f"for {self._idle_s * 1e6:.0f} µs (max_sequence_idle_microseconds); start it "
                "again with sequence_start"
            )
        raise InvalidInputError(
            f"inference request for sequence {correlation_id!r} to model '{self._name}' "
            "must specify the START flag on the first request of the sequence"
        )

    async def _run_turn(self, sequence: Sequence, request: InferRequest) -> Outputs:
        start = request.sequence_start
        if start:
            sequence.state.clear()
        feeds = dict(request.inputs)
        rows = (request.rows,) if self._batched else ()
        for control in self._controls:
            feeds[control.name] = self._control_value(control, request, rows)
        for state in self._states:
            value = sequence.state.get(state.input_name)
            feeds[state.input_name] = (
                value if value is not None else np.zeros(rows + state.dims, dtype=state.dtype)
            )
        request.inputs = feeds
        outputs = await self._batcher.run(request)
        for state in self._states:
            # A copy: the batch's output buffer is shared with the other rows.
            sequence.state[state.input_name] = np.array(outputs[state.output_name])
        return {k: v for k, v in outputs.items() if k not in self._state_outputs}

    def _control_value(
        self, control: Control, request: InferRequest, rows: tuple[int, ...]
    ) -> Array:
        shape = (*rows, 1)
        if control.kind == Kind.CONTROL_SEQUENCE_CORRID:
            value: Any = request.correlation_id
            if control.dtype.kind in "iu" and not isinstance(value, int):
                raise InvalidInputError(
                    f"model '{self._name}' takes integer correlation IDs "
                    f"(its {control.name} is {control.dtype}), got the string {value!r}"
                )
            if control.dtype == np.object_:
                value = str(value)
            return np.full(shape, value, dtype=control.dtype)
        if control.kind == Kind.CONTROL_SEQUENCE_START:
            flag = request.sequence_start
        elif control.kind == Kind.CONTROL_SEQUENCE_END:
            flag = request.sequence_end
        else:  # CONTROL_SEQUENCE_READY: the request is in this batch
            flag = True
        return np.full(shape, control.values[1 if flag else 0], dtype=control.dtype)

    def _after(self, sequence: Sequence, request: InferRequest) -> None:
        """Release an ended sequence; otherwise restart its idle clock."""
        if self._sequences.get(sequence.correlation_id) is not sequence:
            return
        if request.sequence_end and sequence.active == 0:
            del self._sequences[sequence.correlation_id]
            return
        if sequence.active == 0:
            loop = asyncio.get_running_loop()
            sequence.timer = loop.call_later(self._idle_s, self._expire, sequence)

    def _expire(self, sequence: Sequence) -> None:
        if sequence.active or self._sequences.get(sequence.correlation_id) is not sequence:
            return
        del self._sequences[sequence.correlation_id]
        self._timed_out[sequence.correlation_id] = None
        while len(self._timed_out) > REMEMBER_TIMED_OUT:
            self._timed_out.popitem(last=False)

    async def wait_idle(self) -> None:
        await self._batcher.wait_idle()

    def close(self) -> None:
        self._closed = True
        for sequence in self._sequences.values():
            if sequence.timer is not None:
                sequence.timer.cancel()
        self._sequences.clear()
        self._batcher.close()
