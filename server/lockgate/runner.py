"""Model instances: ONNX Runtime sessions, and the threads that run batches on them.

A ``Runner`` is one model instance: one ``InferenceSession`` whose ``run``
is called from its ``InstanceWorker`` thread (ONNX Runtime releases the GIL),
never from the event loop. The thread merges a batch's inputs, runs the
session, splits the outputs per request, and re-runs a batch ONNX Runtime
rejects request by request so that only the request at fault fails.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from lockgate import providers as execution
from lockgate.binding import BoundRunner, GraphRunner, bindable
from lockgate.config import OnnxTensor
from lockgate.errors import ExecutionError, LockgateError, ModelLoadError
from lockgate.request import Array, InferRequest, Outputs
from lockgate.reshape import Reshaper
from lockgate_client._proto import model_config_pb2 as mc

log = logging.getLogger("lockgate.runner")

T = TypeVar("T")

_BF16 = 16  # onnx.TensorProto.BFLOAT16: numpy has no such dtype


_probe_lock = threading.Lock()


def cuda_device_count() -> int:
    """GPUs ONNX Runtime can use here, decided (and logged) once per process."""
    # Models load in parallel threads; functools.cache alone lets each of the
    # first callers probe, and log the same line, at once.
    with _probe_lock:
        return _probe_cuda()


@functools.cache
def _probe_cuda() -> int:
    """Asking onnxruntime-gpu for CUDA on a machine without a driver prints a
    stack of errors before it falls back; probing the driver ourselves lets
    us log one clear line instead.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        log.info("ONNX Runtime has no CUDA provider: running models on CPU")
        return 0
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            raise OSError("cuInit failed")
    except OSError:
        log.info("no usable NVIDIA driver/GPU found: running models on CPU")
        return 0
    log.info("found %d CUDA device(s)", count.value)
    return count.value


@dataclass(frozen=True)
class Placement:
    """Where one instance runs: a GPU id, or None for the CPU."""

    gpu: int | None
    intra_op_threads: int
    #: How far below the server's other threads this instance's threads run
    #: (a nice increment; see ``lower_thread_priority``).
    nice: int = 0

    @property
    def label(self) -> str:
        return f"gpu{self.gpu}" if self.gpu is not None else "cpu"


def plan_instances(config: mc.ModelConfig, nice: int = 0) -> list[Placement]:
    """Expand ``instance_group`` into one placement per instance.

    KIND_AUTO and KIND_GPU take the listed GPUs (all, if none are listed) and
    fall back to the CPU where none are usable; thread counts default to an
    even share of the cores so N instances do not oversubscribe them.
    """
    gpus = cuda_device_count()
    kinds: list[int | None] = []
    groups = list(config.instance_group) or [mc.ModelInstanceGroup(count=1)]
    for group in groups:
        if group.kind in (mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_AUTO) and gpus:
            listed = list(group.gpus) or list(range(gpus))
            for gpu in listed:
                if gpu >= gpus:
                    raise ModelLoadError(
                        f"model '{config.name}': instance_group lists GPU {gpu} but only "
                        f"{gpus} are present"
                    )
                kinds.extend([gpu] * max(1, group.count))
        elif group.kind == mc.ModelInstanceGroup.KIND_MODEL:
            raise ModelLoadError(f"model '{config.name}': KIND_MODEL is not supported")
        else:
            kinds.extend([None] * max(1, group.count))
    cpu_instances = sum(1 for k in kinds if k is None) or 1
    default_threads = max(1, (os.cpu_count() or 1) // cpu_instances)
    threads = _int_parameter(config, "intra_op_thread_count", default_threads)
    return [Placement(gpu=k, intra_op_threads=threads, nice=nice) for k in kinds]


def _int_parameter(config: mc.ModelConfig, key: str, default: int) -> int:
    if key not in config.parameters:
        return default
    text = config.parameters[key].string_value
    try:
        return int(text)
    except ValueError:
        raise ModelLoadError(
            f"model '{config.name}': parameter {key} must be an integer, got '{text}'"
        ) from None


def session_options(config: mc.ModelConfig, placement: Placement) -> ort.SessionOptions:
    """Session options from the config, using Triton's ORT backend keys."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = placement.intra_op_threads
    options.inter_op_num_threads = _int_parameter(config, "inter_op_thread_count", 1)
    if _int_parameter(config, "execution_mode", 0) == 1:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    # Triton's graph levels: -1 basic, 1 extended, anything else all.
    level = config.optimization.graph.level
    options.graph_optimization_level = {
        -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.enable_cpu_mem_arena = bool(_int_parameter(config, "enable_mem_arena", 1))
    options.enable_mem_pattern = bool(_int_parameter(config, "enable_mem_pattern", 1))
    # Spinning worker threads burn the cores the gRPC front end needs between
    # batches; measured on 2 cores it cut `simple` throughput by more than half.
    spin = str(_int_parameter(config, "allow_spinning", 0))
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    # Fatal only: ONNX Runtime logs every failed run, and a client sending
    # bad data must not be able to flood the server's log. Failures reach
    # the caller (and our own log) as ExecutionError.
    options.log_severity_level = 4
    return options


class Runner:
    """One model instance: an ONNX Runtime session and how to feed it."""

    def __init__(self, model_path: Path, config: mc.ModelConfig, placement: Placement) -> None:
        self.placement = placement
        chosen = execution.for_instance(config, placement.gpu)
        if chosen.unused:
            log.info(
                "model %s: %s unused on this %s instance",
                config.name,
                ", ".join(chosen.unused),
                placement.label,
            )
        try:
            # ONNX Runtime starts the session's thread pool here; threads inherit
            # the nice value of the thread that starts them.
            self.session = in_lowered_thread(
                placement.nice,
                functools.partial(
                    ort.InferenceSession,
                    str(model_path),
                    sess_options=session_options(config, placement),
                    providers=chosen.providers,
                ),
            )
        except Exception as exc:  # ORT raises several unrelated types here
            raise ModelLoadError(f"ONNX Runtime cannot load {model_path}: {exc}") from None
        on_gpu = placement.gpu is not None and (execution.CUDA in self.session.get_providers())
        if placement.gpu is not None and not on_gpu:
            log.warning("model %s: CUDA provider unavailable, instance runs on CPU", config.name)
        self.inputs = [_describe(i) for i in self.session.get_inputs()]
        self.outputs = [_describe(o) for o in self.session.get_outputs()]
        self.output_names = [o.name for o in self.outputs]
        self._bf16_inputs = {t.name for t in self.inputs if t.ort_type == "tensor(bfloat16)"}
        self._bf16_outputs = any(t.ort_type == "tensor(bfloat16)" for t in self.outputs)
        #: Set once the config is complete; None when no tensor is reshaped.
        self.reshaper: Reshaper | None = None
        self.bound = _bound_runner(config, self.session, placement, on_gpu, chosen.cuda_graph)

    def run(self, feeds: dict[str, Array]) -> dict[str, Array]:
        """Run the session on one batch (wire shapes in and out); called in a worker thread."""
        reshaper = self.reshaper
        if reshaper is not None:
            feeds = reshaper.to_model(feeds)
        try:
            if self.bound is not None:
                values = self.bound.run(feeds)
            elif self._bf16_inputs or self._bf16_outputs:
                values = self._run_ort_values(feeds)
            else:
                values = self.session.run(self.output_names, feeds)
        except Exception as exc:  # ORT's error types are not importable in a stable way
            raise ExecutionError(f"model execution failed: {_short(exc)}") from None
        outputs = dict(zip(self.output_names, values, strict=True))
        return outputs if reshaper is None else reshaper.to_wire(outputs)

    def _run_ort_values(self, feeds: dict[str, Array]) -> list[Array]:
        """BF16 path: numpy has no bfloat16, so pass and take raw bits via OrtValue."""
        ort_feeds = {
            name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(value), _BF16
            )
            if name in self._bf16_inputs
            else ort.OrtValue.ortvalue_from_numpy(_ort_ready(value))
            for name, value in feeds.items()
        }
        results = self.session.run_with_ort_values(self.output_names, ort_feeds)
        return [_ortvalue_to_numpy(v) for v in results]


def _bound_runner(
    config: mc.ModelConfig,
    session: ort.InferenceSession,
    placement: Placement,
    on_gpu: bool,
    cuda_graph: bool,
) -> BoundRunner | GraphRunner | None:
    """IO binding where it pays: on by default on GPUs, off on CPUs.

    On the CPU it was measured no faster for the MLP and image models and about
    20 µs a run slower for ``simple`` (bench/io_binding.py), so it is off there
    unless the model's ``io_binding`` parameter turns it on.
    """
    wanted = bool(_int_parameter(config, "io_binding", 1 if on_gpu else 0))
    if cuda_graph and on_gpu:
        if not bindable(session):
            raise ModelLoadError(
                f"model '{config.name}': enable_cuda_graph needs IO binding, which "
                "string and bfloat16 tensors cannot use"
            )
        try:
            return GraphRunner(session, "cuda", placement.gpu if placement.gpu is not None else 0)
        except ValueError as exc:
            raise ModelLoadError(f"model '{config.name}': {exc}") from None
    if wanted and bindable(session):
        return BoundRunner(session)
    return None


def _ort_ready(value: Array) -> Array:
    return value if value.dtype != np.object_ else value.astype(np.str_)


def _ortvalue_to_numpy(value: ort.OrtValue) -> Array:
    if value.data_type() != "tensor(bfloat16)":
        return np.asarray(value.numpy())
    shape = tuple(value.shape())
    count = int(np.prod(shape))
    buffer = (ctypes.c_uint16 * count).from_address(value.data_ptr())
    bits: Array = np.frombuffer(bytes(buffer), dtype=np.uint16)
    return bits.reshape(shape)


def _describe(node: Any) -> OnnxTensor:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or []))
    return OnnxTensor(name=node.name, ort_type=node.type, shape=shape)


def _short(exc: Exception) -> str:
    text = str(exc).strip()
    return text if len(text) < 500 else text[:500] + "..."


# --- instance threads: merge, run, split -------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One successful session run: its rows and compute input/infer/output ns."""

    rows: int
    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass
class BatchResult:
    """What a worker thread hands back for one batch."""

    #: Per request, in batch order: its outputs and the run that made them, or its error.
    results: list[tuple[Outputs, Execution] | LockgateError]
    #: The session runs that succeeded: one, or one per request after a re-run.
    executions: list[Execution]


def merge_inputs(batch: list[InferRequest]) -> dict[str, Array]:
    """Concatenate the batch's inputs along the batch axis."""
    if len(batch) == 1:
        return batch[0].inputs
    first = batch[0].inputs
    return {name: np.concatenate([r.inputs[name] for r in batch]) for name in first}


def split_outputs(outputs: Outputs, batch: list[InferRequest]) -> list[Outputs]:
    """Give each request its own rows of every output (views, no copies)."""
    if len(batch) == 1:
        return [outputs]
    total = sum(r.rows for r in batch)
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != total:
            raise ExecutionError(
                f"model output '{name}' has shape {list(value.shape)}; a batched model's "
                f"outputs must start with the batch size ({total})"
            )
    parts: list[Outputs] = []
    start = 0
    for request in batch:
        end = start + request.rows
        parts.append({name: value[start:end] for name, value in outputs.items()})
        start = end
    return parts


Done = Callable[["BatchResult | BaseException"], None]


class InstanceWorker:
    """The thread that runs one instance's batches.

    A dedicated thread fed through a SimpleQueue costs about half the CPU of a
    ThreadPoolExecutor round trip (measured: 58 vs 105 µs), which matters
    when the model itself runs in 12 µs.
    """

    def __init__(self, runner: Runner, name: str) -> None:
        self._runner = runner
        self._queue: SimpleQueue[tuple[list[InferRequest], Done] | None] = SimpleQueue()
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def submit(self, batch: list[InferRequest], done: Done) -> None:
        self._queue.put((batch, done))

    def stop(self) -> None:
        self._queue.put(None)

    def _work(self) -> None:
        lower_thread_priority(self._runner.placement.nice)
        while (item := self._queue.get()) is not None:
            batch, done = item
            try:
                outcome: BatchResult | BaseException = run_batch(self._runner, batch)
            except BaseException as exc:  # delivered to the batch's callers
                outcome = exc
            done(outcome)


def lower_thread_priority(increment: int) -> None:
    """Let the calling thread, and the threads it starts, yield the CPU to the server's others.

    Where cores are short, the kernel shares them fairly between ONNX
    Runtime's threads and the threads that take requests in and answer them.
    A batch then runs while the next requests wait for a core, so the next
    batch gathers fewer of them: the model runs more, smaller batches. Run
    at a lower priority, compute takes the cores the network threads leave;
    where cores are plenty, nothing changes. Linux only (its nice value is
    per thread); elsewhere, and where the kernel refuses, a no-op.
    """
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError as exc:
        log.debug("cannot lower the priority of thread %d: %s", tid, exc)


def in_lowered_thread(increment: int, make: Callable[[], T]) -> T:
    """``make()`` in a short-lived thread of lowered priority (what it starts inherits it)."""
    if increment <= 0:
        return make()
    with ThreadPoolExecutor(
        1, "lockgate-session", initializer=lower_thread_priority, initargs=(increment,)
    ) as thread:
        return thread.submit(make).result()


def run_batch(runner: Runner, batch: list[InferRequest]) -> BatchResult:
    """Merge, run and split one batch; runs in a worker thread.

    If ONNX Runtime rejects a merged batch, each request is re-run alone so
    that only the one at fault fails.
    """
    try:
        return _run_merged(runner, batch)
    except ExecutionError:
        if len(batch) == 1:
            raise
    return _run_one_by_one(runner, batch)


def _run_merged(runner: Runner, batch: list[InferRequest]) -> BatchResult:
    clock = time.perf_counter_ns
    start = clock()
    feeds = merge_inputs(batch)
    merged = clock()
    outputs = runner.run(feeds)
    ran = clock()
    parts = split_outputs(outputs, batch)
    run = Execution(sum(r.rows for r in batch), merged - start, ran - merged, clock() - ran)
    return BatchResult([(part, run) for part in parts], [run])


def _run_one_by_one(runner: Runner, batch: list[InferRequest]) -> BatchResult:
    results: list[tuple[Outputs, Execution] | LockgateError] = []
    executions: list[Execution] = []
    for request in batch:
        try:
            alone = _run_merged(runner, [request])
        except ExecutionError as error:
            results.append(error)
            continue
        results += alone.results
        executions += alone.executions
    return BatchResult(results, executions)
