"""Queue -> batch -> instance: Lockgate's scheduler, with Triton's semantics.

One ``Scheduler`` per model version. ``submit`` puts a request in its
priority queue and returns at once; ``_dispatch`` runs synchronously on the
event loop whenever something changes (a request arrives, an instance frees
up, a delay or timeout fires) and hands batches to idle instances. Batches
run in worker threads (ONNX Runtime releases the GIL); their results are
split back per request on the loop.

Rules, in order of importance:

* A batch never exceeds ``max_batch_size`` *rows* (requests may carry
  several), and only requests whose non-batch shapes agree are merged.
* A request whose caller has gone, or whose deadline has passed, is dropped
  before it reaches a session.
* A batch ONNX Runtime rejects is re-run request by request, so only the
  request at fault fails.
* With no ``dynamic_batching`` each request is its own execution; several
  instances still run concurrently.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from lockgate_client._proto import model_config_pb2 as mc

from lockgate.errors import (
    ExecutionError,
    LockgateError,
    ModelUnavailableError,
    QueueFullError,
    RequestTimeoutError,
)
from lockgate.request import Array, InferRequest
from lockgate.runner import Runner
from lockgate.stats import ModelStats

Outputs = dict[str, Array]


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for one priority level."""

    max_queue_size: int = 0
    default_timeout_ns: int = 0
    allow_override: bool = False
    delay_on_timeout: bool = False

    @classmethod
    def from_proto(cls, policy: mc.ModelQueuePolicy) -> QueuePolicy:
        return cls(
            max_queue_size=policy.max_queue_size,
            default_timeout_ns=policy.default_timeout_microseconds * 1000,
            allow_override=policy.allow_timeout_override,
            delay_on_timeout=policy.timeout_action == mc.ModelQueuePolicy.DELAY,
        )


@dataclass
class BatchResult:
    """What a worker thread hands back for one batch."""

    outputs: list[Outputs | LockgateError]
    input_ns: int
    infer_ns: int
    output_ns: int


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


class Scheduler:
    """Queues, batches and dispatches one model version's requests."""

    def __init__(
        self,
        config: mc.ModelConfig,
        runners: list[Runner],
        stats: ModelStats,
    ) -> None:
        self._runners = runners
        self._idle = list(runners)
        self._stats = stats
        self._executor = ThreadPoolExecutor(
            max_workers=len(runners), thread_name_prefix=f"lockgate-{config.name}"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        dynamic = config.WhichOneof("scheduling_choice") == "dynamic_batching"
        batching = config.dynamic_batching
        # Without dynamic batching every request is its own execution.
        self.max_rows = config.max_batch_size if dynamic and config.max_batch_size > 0 else 0
        self.delay_ns = batching.max_queue_delay_microseconds * 1000 if dynamic else 0
        self.preferred = sorted(set(batching.preferred_batch_size)) if dynamic else []
        self.preserve_ordering = dynamic and batching.preserve_ordering
        levels = int(batching.priority_levels) if dynamic and batching.priority_levels else 1
        self.default_level = int(batching.default_priority_level or 1) if levels > 1 else 1
        default_policy = QueuePolicy.from_proto(batching.default_queue_policy)
        self._policies = [
            QueuePolicy.from_proto(batching.priority_queue_policy[level])
            if level in batching.priority_queue_policy
            else default_policy
            for level in range(1, levels + 1)
        ]
        self._queues: list[deque[InferRequest]] = [deque() for _ in range(levels)]
        #: Requests whose queue timeout passed under timeout_action DELAY.
        self._delayed: deque[InferRequest] = deque()
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._delay_timer: asyncio.TimerHandle | None = None
        self._sequence = 0
        self._running = 0
        # preserve_ordering: results wait here until every earlier batch is done.
        self._next_batch = 0
        self._batch_counter = 0
        self._finished: dict[int, tuple[list[InferRequest], BatchResult | BaseException]] = {}
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._closed = False

    # --- intake ---------------------------------------------------------------

    def submit(self, request: InferRequest) -> asyncio.Future[Outputs]:
        """Queue ``request``; the returned future resolves with its outputs."""
        if self._closed:
            raise ModelUnavailableError("model is unloading; no new requests accepted")
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        level = self._level(request)
        policy = self._policies[level - 1]
        queue = self._queues[level - 1]
        if policy.max_queue_size and len(queue) >= policy.max_queue_size:
            raise QueueFullError(
                f"the queue for priority level {level} is full ({policy.max_queue_size} "
                "requests); retry later"
            )
        future: asyncio.Future[Outputs] = loop.create_future()
        request.future = future
        self._sequence += 1
        request.sequence = self._sequence
        timeout_ns = policy.default_timeout_ns
        if request.timeout_us and (policy.allow_override or not timeout_ns):
            timeout_ns = request.timeout_us * 1000
        if timeout_ns:
            self._timers[request.sequence] = loop.call_at(
                loop.time() + timeout_ns * 1e-9, self._expire, request, level, policy
            )
        queue.append(request)
        future.add_done_callback(self._on_done)
        self._dispatch()
        return future

    def _level(self, request: InferRequest) -> int:
        levels = len(self._queues)
        if not request.priority:
            return self.default_level
        if request.priority > levels:
            # Triton: out-of-range priorities take the default level.
            return self.default_level
        return request.priority

    def _on_done(self, future: asyncio.Future[Outputs]) -> None:
        # A caller that leaves (cancel/deadline) frees its queue slot at once;
        # the stale entry is skipped when the next batch forms.
        if future.cancelled():
            self._dispatch()

    def _expire(self, request: InferRequest, level: int, policy: QueuePolicy) -> None:
        self._timers.pop(request.sequence, None)
        queue = self._queues[level - 1]
        if request.future is None or request.future.done() or request not in queue:
            return
        queue.remove(request)
        if policy.delay_on_timeout:
            self._delayed.append(request)
            return
        request.future.set_exception(
            RequestTimeoutError("request timed out in the queue before it could run")
        )

    # --- batching -------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand batches to idle instances while there is work for them."""
        while self._idle:
            batch = self._take_batch()
            if not batch:
                return
            self._start(self._idle.pop(), batch)

    def _live_head(self) -> InferRequest | None:
        """The oldest live request of the highest priority; drops dead ones."""
        now = time.monotonic()
        for queue in (*self._queues, self._delayed):
            while queue:
                request = queue[0]
                if self._still_wanted(request, now):
                    return request
                queue.popleft()
        return None

    def _still_wanted(self, request: InferRequest, now: float) -> bool:
        future = request.future
        assert future is not None
        if future.done():
            self._forget(request)
            return False
        if request.deadline is not None and now >= request.deadline:
            self._forget(request)
            future.set_exception(
                RequestTimeoutError("the request's deadline passed while it was queued")
            )
            return False
        return True

    def _forget(self, request: InferRequest) -> None:
        timer = self._timers.pop(request.sequence, None)
        if timer is not None:
            timer.cancel()

    def _take_batch(self) -> list[InferRequest]:
        head = self._live_head()
        if head is None:
            return []
        if not self.max_rows:
            return self._remove([head])
        batch, rows = self._gather(head)
        if rows < self.max_rows and rows not in self.preferred:
            waited = time.monotonic_ns() - head.arrival_ns
            if waited < self.delay_ns:
                trimmed = self._trim_to_preferred(batch)
                if not trimmed:
                    self._wait_for_delay(head.arrival_ns + self.delay_ns)
                    return []
                batch = trimmed
        return self._remove(batch)

    def _gather(self, head: InferRequest) -> tuple[list[InferRequest], int]:
        """Requests that can join ``head``'s batch, in priority then arrival order."""
        batch = [head]
        rows = head.rows
        now = time.monotonic()
        for queue in (*self._queues, self._delayed):
            for request in queue:
                if request is head or request.shape_key != head.shape_key:
                    continue
                if rows + request.rows > self.max_rows:
                    return batch, rows
                if request.future is None or request.future.done():
                    continue
                if request.deadline is not None and now >= request.deadline:
                    continue
                batch.append(request)
                rows += request.rows
                if rows == self.max_rows:
                    return batch, rows
        return batch, rows

    def _trim_to_preferred(self, batch: list[InferRequest]) -> list[InferRequest]:
        """The longest prefix of ``batch`` whose rows are a preferred size, if any."""
        best: list[InferRequest] = []
        rows = 0
        for i, request in enumerate(batch):
            rows += request.rows
            if rows in self.preferred:
                best = batch[: i + 1]
        return best

    def _wait_for_delay(self, due_ns: int) -> None:
        if self._delay_timer is not None or self._loop is None:
            return
        delay = max(0.0, (due_ns - time.monotonic_ns()) * 1e-9)
        self._delay_timer = self._loop.call_later(delay, self._delay_elapsed)

    def _delay_elapsed(self) -> None:
        self._delay_timer = None
        self._dispatch()

    def _remove(self, batch: list[InferRequest]) -> list[InferRequest]:
        chosen = set(map(id, batch))
        for i, queue in enumerate(self._queues):
            if any(id(r) in chosen for r in queue):
                self._queues[i] = deque(r for r in queue if id(r) not in chosen)
        if self._delayed and any(id(r) in chosen for r in self._delayed):
            self._delayed = deque(r for r in self._delayed if id(r) not in chosen)
        now = time.monotonic_ns()
        for request in batch:
            self._forget(request)
            request.dequeue_ns = now
        return batch

    # --- execution ------------------------------------------------------------

    def _start(self, runner: Runner, batch: list[InferRequest]) -> None:
        assert self._loop is not None
        self._running += 1
        number = self._batch_counter
        self._batch_counter += 1
        work: Future[BatchResult] = self._executor.submit(run_batch, runner, batch)
        loop = self._loop

        def done(work: Future[BatchResult]) -> None:
            loop.call_soon_threadsafe(self._finish, runner, batch, number, work)

        work.add_done_callback(done)

    def _finish(
        self, runner: Runner, batch: list[InferRequest], number: int, work: Future[BatchResult]
    ) -> None:
        self._running -= 1
        self._idle.append(runner)
        try:
            outcome: BatchResult | BaseException = work.result()
        except BaseException as exc:  # delivered to the batch's callers below
            outcome = exc
        if self.preserve_ordering:
            self._finished[number] = (batch, outcome)
            while self._next_batch in self._finished:
                self._deliver(*self._finished.pop(self._next_batch))
                self._next_batch += 1
        else:
            self._deliver(batch, outcome)
        self._dispatch()
        if not self._running and not self.queued:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    def _deliver(self, batch: list[InferRequest], outcome: BatchResult | BaseException) -> None:
        if isinstance(outcome, BaseException):
            error = outcome if isinstance(outcome, LockgateError) else ExecutionError(
                f"model execution failed: {outcome}"
            )
            for request in batch:
                _resolve(request, error)
            return
        rows = sum(r.rows for r in batch)
        self._stats.record_execution(rows, outcome.input_ns, outcome.infer_ns, outcome.output_ns)
        for request, result in zip(batch, outcome.outputs, strict=True):
            request.compute_ns = (outcome.input_ns, outcome.infer_ns, outcome.output_ns)
            _resolve(request, result)

    # --- lifecycle ------------------------------------------------------------

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues) + len(self._delayed)

    @property
    def pending(self) -> int:
        """Requests waiting for an instance whose callers still wait for them."""
        return sum(
            1
            for queue in (*self._queues, self._delayed)
            for r in queue
            if r.future is not None and not r.future.done()
        )

    @property
    def busy(self) -> bool:
        return bool(self._running or self.queued)

    async def wait_idle(self) -> None:
        """Return once nothing is queued or running."""
        if not self.busy:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        await waiter

    def close(self) -> None:
        """Refuse new work and fail what is still queued."""
        self._closed = True
        for queue in (*self._queues, self._delayed):
            while queue:
                request = queue.popleft()
                if request.future is not None and not request.future.done():
                    self._forget(request)
                    request.future.set_exception(
                        ModelUnavailableError("model was unloaded before the request ran")
                    )
        if self._delay_timer is not None:
            self._delay_timer.cancel()
        self._executor.shutdown(wait=False)


def _resolve(request: InferRequest, result: Outputs | BaseException) -> None:
    future = request.future
    if future is None or future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def run_batch(runner: Runner, batch: list[InferRequest]) -> BatchResult:
    """Merge, run and split one batch; runs in a worker thread.

    If ONNX Runtime rejects a merged batch, each request is re-run alone so
    that only the one at fault fails.
    """
    clock: Callable[[], int] = time.perf_counter_ns
    start = clock()
    feeds = merge_inputs(batch)
    merged = clock()
    try:
        outputs = runner.run(feeds)
    except ExecutionError as error:
        if len(batch) == 1:
            raise
        del error
        return _run_one_by_one(runner, batch, start)
    ran = clock()
    parts = split_outputs(outputs, batch)
    split = clock()
    return BatchResult(list(parts), merged - start, ran - merged, split - ran)


def _run_one_by_one(runner: Runner, batch: list[InferRequest], start: int) -> BatchResult:
    results: list[Outputs | LockgateError] = []
    for request in batch:
        try:
            results.append(runner.run(request.inputs))
        except ExecutionError as error:
            results.append(error)
    return BatchResult(results, 0, time.perf_counter_ns() - start, 0)
