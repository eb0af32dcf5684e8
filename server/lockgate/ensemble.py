"""Ensembles: Triton's ``ensemble_scheduling``, a DAG of models in one request.

An ensemble is a model version like any other to the servicer: its config
declares inputs and outputs, requests are decoded against them, and its
``EnsembleScheduler`` takes the place of the batcher. Each step is a request
to a composing model's own ``ModelVersion.infer``, so it queues and batches
with every other request to that model (and counts in that model's
statistics, as in Triton). A step starts as soon as the tensors it reads
exist; errors name the step.

Everything that can be checked without data is checked at load: the steps'
tensors (each produced once, each read one produced or an ensemble input),
cycles, and the composing models' names, inputs, outputs and datatypes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lockgate.codec import TensorSpec
from lockgate.errors import (
    InternalError,
    InvalidInputError,
    LockgateError,
    ModelLoadError,
    ModelUnavailableError,
)
from lockgate.request import Array, InferRequest
from lockgate.stats import ModelStats
from lockgate_client._proto import model_config_pb2 as mc

if TYPE_CHECKING:
    from lockgate.model import ModelVersion

PLATFORM = "ensemble"

Outputs = dict[str, Array]
#: (model name, version or "" for the latest) -> the ready version; raises LockgateError.
Resolve = Callable[[str, str], "ModelVersion"]


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == PLATFORM or config.HasField("ensemble_scheduling")


def dependencies(config: mc.ModelConfig) -> list[str]:
    """The composing models an ensemble's steps name, in step order, once each."""
    names = [step.model_name for step in config.ensemble_scheduling.step]
    return list(dict.fromkeys(n for n in names if n))


@dataclass(frozen=True)
class Step:
    """One step of the plan: which model, and which ensemble tensors go in and out."""

    number: int
    model: str
    #: "" is the latest ready version (Triton's model_version -1).
    version: str
    #: (model input, ensemble tensor), in the model's input order once checked.
    inputs: tuple[tuple[str, str], ...]
    #: (model output, ensemble tensor).
    outputs: tuple[tuple[str, str], ...]

    @property
    def reads(self) -> frozenset[str]:
        return frozenset(tensor for _, tensor in self.inputs)

    def label(self, ensemble: str) -> str:
        return f"ensemble '{ensemble}' step {self.number} (model '{self.model}')"


def complete_ensemble_config(config: mc.ModelConfig, name: str) -> None:
    """Fill defaults and refuse what an ensemble cannot be, in place."""
    config.name = config.name or name
    if config.name != name:
        raise ModelLoadError(
            f"config.pbtxt names model '{config.name}' but its directory is '{name}'"
        )
    if config.platform != PLATFORM:
        raise ModelLoadError(f"model '{name}': ensemble_scheduling needs platform: \"{PLATFORM}\"")
    if config.WhichOneof("scheduling_choice") != "ensemble_scheduling":
        raise ModelLoadError(
            f"model '{name}': an ensemble needs ensemble_scheduling {{ step [...] }}"
        )
    if not config.input or not config.output:
        raise ModelLoadError(
            f"model '{name}': an ensemble must declare its inputs and outputs in config.pbtxt"
        )
    for tensor in list(config.input) + list(config.output):
        if tensor.HasField("reshape"):
            raise ModelLoadError(
                f"model '{name}': ensemble tensor '{tensor.name}' has a reshape; reshape "
                "belongs in the composing model's config"
            )
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1


def plan_steps(config: mc.ModelConfig) -> list[Step]:
    """The steps in an order where each reads only what exists before it.

    Raises ModelLoadError naming the problem: a step without a model, a tensor
    produced twice, one read but never produced, an output nothing produces,
    or a cycle.
    """
    name = config.name
    inputs = {t.name for t in config.input}
    steps: list[Step] = []
    producer: dict[str, Step] = {}
    for number, entry in enumerate(config.ensemble_scheduling.step, start=1):
        if not entry.model_name:
            raise ModelLoadError(f"ensemble '{name}' step {number} names no model")
        step = Step(
            number=number,
            model=entry.model_name,
            version="" if entry.model_version < 0 else str(entry.model_version),
            inputs=tuple(sorted(entry.input_map.items())),
            outputs=tuple(sorted(entry.output_map.items())),
        )
        for _, tensor in step.outputs:
            if tensor in inputs:
                raise ModelLoadError(
                    f"{step.label(name)} writes '{tensor}', which is an input of the ensemble"
                )
            if tensor in producer:
                raise ModelLoadError(
                    f"{step.label(name)} writes '{tensor}', which step "
                    f"{producer[tensor].number} (model '{producer[tensor].model}') writes too"
                )
            producer[tensor] = step
        steps.append(step)
    if not steps:
        raise ModelLoadError(f"ensemble '{name}' has no steps")
    for step in steps:
        for model_input, tensor in step.inputs:
            if tensor not in inputs and tensor not in producer:
                raise ModelLoadError(
                    f"{step.label(name)} input '{model_input}' reads '{tensor}', which is "
                    "neither an ensemble input nor any step's output"
                )
    for output in config.output:
        if output.name not in producer:
            raise ModelLoadError(
                f"ensemble '{name}' output '{output.name}' is not written by any step"
            )
    return _ordered(name, steps, inputs)


def _ordered(name: str, steps: list[Step], inputs: set[str]) -> list[Step]:
    available = set(inputs)
    ordered: list[Step] = []
    waiting = list(steps)
    while waiting:
        ready = [s for s in waiting if s.reads <= available]
        if not ready:
            cycle = ", ".join(f"step {s.number} (model '{s.model}')" for s in waiting)
            raise ModelLoadError(
                f"ensemble '{name}' has a cycle: {cycle} each wait for another's output"
            )
        for step in ready:
            available.update(tensor for _, tensor in step.outputs)
            ordered.append(step)
            waiting.remove(step)
    return ordered


def check_steps(config: mc.ModelConfig, steps: list[Step], resolve: Resolve) -> list[Step]:
    """Check each step against its composing model; returns the steps with inputs in
    the model's own order (so step requests batch with direct traffic)."""
    name = config.name
    datatypes: dict[str, int] = {t.name: t.data_type for t in config.input}
    for step in steps:
        for _, tensor in step.outputs:
            datatypes.setdefault(tensor, mc.TYPE_INVALID)
    checked: list[Step] = []
    for step in steps:
        label = step.label(name)
        try:
            model = resolve(step.model, step.version)
        except LockgateError as exc:
            raise ModelLoadError(f"{label}: {exc.message}") from None
        if config.max_batch_size > model.config.max_batch_size:
            raise ModelLoadError(
                f"{label}: the ensemble's max_batch_size {config.max_batch_size} is more "
                f"than the model's ({model.config.max_batch_size})"
            )
        model_inputs = {t.name: t for t in model.config.input}
        model_outputs = {t.name: t for t in model.config.output}
        mapped = dict(step.inputs)
        for model_input in mapped:
            if model_input not in model_inputs:
                raise ModelLoadError(
                    f"{label}: input_map names '{model_input}', but the model's inputs are "
                    f"{sorted(model_inputs)}"
                )
        for model_input, spec in model_inputs.items():
            if model_input not in mapped:
                if not spec.optional:
                    raise ModelLoadError(
                        f"{label}: the model's input '{model_input}' is not in input_map"
                    )
                continue
            _check_type(label, mapped[model_input], datatypes, spec.data_type)
        for model_output, tensor_name in step.outputs:
            if model_output not in model_outputs:
                raise ModelLoadError(
                    f"{label}: output_map names '{model_output}', but the model's outputs "
                    f"are {sorted(model_outputs)}"
                )
            datatypes[tensor_name] = model_outputs[model_output].data_type
        order = [n for n in model_inputs if n in mapped]
        checked.append(
            Step(
                step.number,
                step.model,
                step.version,
                tuple((n, mapped[n]) for n in order),
                step.outputs,
            )
        )
    for output in config.output:
        _check_type(f"ensemble '{name}' output", output.name, datatypes, output.data_type)
    return checked


def _check_type(label: str, tensor: str, datatypes: dict[str, int], want: int) -> None:
    have = datatypes[tensor]
    if have != mc.TYPE_INVALID and want != mc.TYPE_INVALID and have != want:
        raise ModelLoadError(
            f"{label}: tensor '{tensor}' is {mc.DataType.Name(have)} but "
            f"{mc.DataType.Name(want)} is expected"
        )


class EnsembleScheduler:
    """Runs each request through the steps; the ensemble's stand-in for a batcher."""

    #: Ensembles do not batch themselves: their steps' models do.
    max_rows = 0
    queued = 0
    pending = 0

    def __init__(
        self,
        name: str,
        steps: list[Step],
        output_order: list[str],
        stats: ModelStats,
        resolve: Resolve,
    ) -> None:
        self._name = name
        self._steps = steps
        self._output_order = output_order
        self._stats = stats
        self._resolve = resolve
        self._in_flight = 0
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._closed = False

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    async def run(self, request: InferRequest) -> Outputs:
        """Run the request's steps in the caller's task; the ensemble's outputs.

        No queue and no extra task: cancelling the caller cancels the steps
        still queued or running.
        """
        if self._closed:
            raise ModelUnavailableError("model is unloading; no new requests accepted")
        if not request.arrival_ns:
            request.arrival_ns = time.monotonic_ns()
        self._in_flight += 1
        try:
            return await self._execute(request)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                for waiter in self._idle_waiters:
                    if not waiter.done():
                        waiter.set_result(None)
                self._idle_waiters.clear()

    async def _execute(self, request: InferRequest) -> Outputs:
        tensors: dict[str, Array] = dict(request.inputs)
        waiting = list(self._steps)
        running: dict[asyncio.Task[tuple[Outputs, InferRequest]], Step] = {}
        totals = [0, 0, 0, 0]  # queue, compute input, infer, output (ns)

        def absorb(step: Step, outputs: Outputs, sent: InferRequest) -> None:
            for model_output, tensor in step.outputs:
                tensors[tensor] = outputs[model_output]
            # Triton's ensemble statistics sum the composing models' times.
            totals[0] += sent.dequeue_ns - sent.arrival_ns
            for i, ns in enumerate(sent.compute_ns, start=1):
                totals[i] += ns

        try:
            while waiting or running:
                ready = [s for s in waiting if s.reads <= tensors.keys()]
                for step in ready:
                    waiting.remove(step)
                if len(ready) == 1 and not running:
                    # A chain (the common case): await the step itself, no task.
                    absorb(ready[0], *await self._step(ready[0], tensors, request))
                    continue
                for step in ready:
                    running[asyncio.create_task(self._step(step, tensors, request))] = step
                if not running:
                    raise InternalError(f"ensemble '{self._name}': no step can run")
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    absorb(running.pop(task), *task.result())
        finally:
            for task in running:
                task.cancel()
        request.dequeue_ns = request.arrival_ns + totals[0]
        request.compute_ns = (totals[1], totals[2], totals[3])
        self._stats.record_execution(request.rows, totals[1], totals[2], totals[3])
        wanted = request.outputs
        return {name: tensors[name] for name in (self._output_order if wanted is None else wanted)}

    async def _step(
        self, step: Step, tensors: dict[str, Array], request: InferRequest
    ) -> tuple[Outputs, InferRequest]:
        label = step.label(self._name)
        try:
            model = self._resolve(step.model, step.version)
            inputs = {model_input: tensors[tensor] for model_input, tensor in step.inputs}
            sent = _step_request(label, model, inputs, step, request)
            outputs = await model.infer(sent)
        except LockgateError as exc:
            raise type(exc)(f"{label}: {exc.message}") from None
        return outputs, sent

    async def wait_idle(self) -> None:
        if not self._in_flight:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        await waiter

    def close(self) -> None:
        self._closed = True


def _step_request(
    label: str, model: ModelVersion, inputs: dict[str, Array], step: Step, parent: InferRequest
) -> InferRequest:
    """The composing model's request, checked against its specs like a wire request."""
    batched = model.config.max_batch_size > 0
    rows = 1
    shape_key: list[tuple[str, tuple[int, ...]]] = []
    for name, array in inputs.items():
        spec = model.inputs[name]
        _check_shape(label, spec, array, batched, model.config.max_batch_size)
        if batched:
            rows = array.shape[0]
            shape_key.append((name, array.shape[1:]))
        else:
            shape_key.append((name, array.shape))
    return InferRequest(
        inputs=inputs,
        rows=rows,
        outputs=[model_output for model_output, _ in step.outputs],
        shape_key=tuple(shape_key),
        request_id=parent.request_id,
        priority=parent.priority,
        timeout_us=parent.timeout_us,
        deadline=parent.deadline,
        arrival_ns=time.monotonic_ns(),
    )


def _check_shape(
    label: str, spec: TensorSpec, array: Array, batched: bool, max_batch_size: int
) -> None:
    expected = ((-1,) if batched else ()) + spec.dims
    shape = array.shape
    if len(shape) != len(expected) or any(
        want != -1 and got != want for got, want in zip(shape, expected, strict=True)
    ):
        raise InvalidInputError(
            f"input '{spec.name}' gets a tensor of shape {list(shape)}, but the model "
            f"takes {list(expected)}"
        )
    if batched and not 1 <= shape[0] <= max_batch_size:
        raise InvalidInputError(
            f"input '{spec.name}' gets batch size {shape[0]}, outside the model's "
            f"1..{max_batch_size}"
        )
