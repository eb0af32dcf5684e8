"""Queue -> batch -> instance: Lockgate's scheduler, with Triton's semantics.

One ``Scheduler`` per model version. ``submit`` puts a request in its
priority level's queue and returns at once; ``_dispatch`` runs synchronously
on the event loop whenever something changes (a request arrives, an instance
frees up, a delay or timeout fires) and hands batches to idle instances.
Batches run on their instance's thread (runner.py); each request's future
gets its rows back on the loop.

Rules, in order of importance:

* A batch never exceeds ``max_batch_size`` *rows* (requests may carry
  several), and only requests whose non-batch shapes agree are merged.
* A request whose caller has gone, or whose deadline has passed, is dropped
  before it reaches a session.
* With no ``dynamic_batching`` each request is its own execution; several
  instances still run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lockgate.errors import (
    LockgateError,
    ModelUnavailableError,
    QueueFullError,
    RequestTimeoutError,
)
from lockgate.request import InferRequest, Outputs
from lockgate.runner import BatchResult, InstanceWorker, Runner
from lockgate.stats import ModelStats
from lockgate_client._proto import model_config_pb2 as mc

log = logging.getLogger("lockgate.batcher")


#: Observability hook: called on the event loop as each batch finishes, with the
#: model's stats, the batch and its error (None when it ran). Given to the
#: scheduler when its version loads (tracing's); None costs one check per batch.
BatchObserver = Callable[[ModelStats, list[InferRequest], BaseException | None], None]


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

    def timeout_ns(self, request_timeout_us: int) -> int:
        """How long a request may wait in the queue (ns); 0 is for ever.

        As in Triton, a request's ``timeout`` counts only where the policy
        allows an override, and may shorten the default but never lengthen it.
        """
        timeout_ns = self.default_timeout_ns
        if self.allow_override and request_timeout_us:
            override_ns = request_timeout_us * 1000
            if not timeout_ns or override_ns < timeout_ns:
                timeout_ns = override_ns
        return timeout_ns


@dataclass
class Level:
    """One priority level: its policy and queues (Triton's PolicyQueue)."""

    policy: QueuePolicy
    queue: deque[InferRequest] = field(default_factory=deque)
    #: Requests whose queue timeout passed under timeout_action DELAY: they
    #: run after this level's other requests, before lower levels' ones.
    delayed: deque[InferRequest] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self.queue) + len(self.delayed)


class Scheduler:
    """Queues, batches and dispatches one model version's requests."""

    def __init__(
        self,
        config: mc.ModelConfig,
        runners: list[Runner],
        stats: ModelStats,
        observer: BatchObserver | None = None,
    ) -> None:
        self._idle = list(runners)
        self._stats = stats
        self._observer = observer
        self._workers = {
            id(runner): InstanceWorker(runner, f"lockgate-{config.name}-{i}")
            for i, runner in enumerate(runners)
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        dynamic = config.WhichOneof("scheduling_choice") == "dynamic_batching"
        batching = config.dynamic_batching
        # Without dynamic batching every request is its own execution.
        self.max_rows = config.max_batch_size if dynamic and config.max_batch_size > 0 else 0
        self.delay_ns = batching.max_queue_delay_microseconds * 1000 if dynamic else 0
        self.preferred = sorted(set(batching.preferred_batch_size)) if dynamic else []
        self.preserve_ordering = dynamic and batching.preserve_ordering
        count = int(batching.priority_levels) if dynamic and batching.priority_levels else 1
        self.default_level = int(batching.default_priority_level or 1) if count > 1 else 1
        self.level_count = count
        self._default_policy = QueuePolicy.from_proto(batching.default_queue_policy)
        self._policies = {
            int(number): QueuePolicy.from_proto(policy)
            for number, policy in batching.priority_queue_policy.items()
        }
        #: Levels are made when a request first uses them: a config may declare
        #: many more levels than its callers ever use.
        self._levels: dict[int, Level] = {}
        #: The levels made so far, highest priority (level 1) first.
        self._ordered: list[Level] = []
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._delay_timer: asyncio.TimerHandle | None = None
        self._delay_due_ns = 0
        self._sequence = 0
        self._running = 0
        # preserve_ordering: results wait here until every earlier batch is done.
        self._next_batch = 0
        self._batch_counter = 0
        self._finished: dict[int, tuple[list[InferRequest], BatchResult | BaseException]] = {}
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._closed = False

    # --- intake ---------------------------------------------------------------

    async def run(self, request: InferRequest) -> Outputs:
        """Queue ``request`` and wait for its outputs (``submit``, awaited)."""
        return await self.submit(request)

    def submit(self, request: InferRequest) -> asyncio.Future[Outputs]:
        """Queue ``request``; the returned future resolves with its outputs.

        Raises ``QueueFullError`` at once when its level's queue is full.
        """
        if self._closed:
            raise ModelUnavailableError("model is unloading; no new requests accepted")
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        number = self._level_number(request)
        level = self._levels.get(number) or self._new_level(number)
        policy = level.policy
        if policy.max_queue_size and len(level) >= policy.max_queue_size:
            raise QueueFullError(
                f"the queue for priority level {number} is full ({policy.max_queue_size} "
                "requests); retry later"
            )
        if not request.arrival_ns:
            request.arrival_ns = time.monotonic_ns()
        future: asyncio.Future[Outputs] = loop.create_future()
        request.future = future
        self._sequence += 1
        request.sequence = self._sequence
        timeout_ns = policy.timeout_ns(request.timeout_us)
        if timeout_ns:
            self._timers[request.sequence] = loop.call_at(
                loop.time() + timeout_ns * 1e-9, self._expire, request, level
            )
        level.queue.append(request)
        future.add_done_callback(functools.partial(self._on_done, request, level))
        self._dispatch()
        return future

    def _level_number(self, request: InferRequest) -> int:
        # Triton: priority 0 and out-of-range priorities take the default level.
        if not request.priority or request.priority > self.level_count:
            return self.default_level
        return request.priority

    def _new_level(self, number: int) -> Level:
        level = Level(self._policies.get(number, self._default_policy))
        self._levels[number] = level
        self._ordered = [self._levels[n] for n in sorted(self._levels)]
        return level

    def _on_done(
        self, request: InferRequest, level: Level, future: asyncio.Future[Outputs]
    ) -> None:
        # A caller that leaves (cancel, deadline) frees its queue slot at once,
        # so max_queue_size counts only requests someone still waits for.
        if not future.cancelled():
            return
        self._forget(request)
        for queue in (level.queue, level.delayed):
            with contextlib.suppress(ValueError):  # not there: batched or dropped already
                queue.remove(request)
        self._notify_idle()

    def _expire(self, request: InferRequest, level: Level) -> None:
        """The request's queue timeout passed: reject it, or move it back (DELAY)."""
        self._timers.pop(request.sequence, None)
        future = request.future
        if future is None or future.done() or request not in level.queue:
            return
        level.queue.remove(request)
        if level.policy.delay_on_timeout:
            level.delayed.append(request)
            return
        future.set_exception(
            RequestTimeoutError("request timed out in the queue before it could run")
        )
        self._notify_idle()

    # --- batching -------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand batches to idle instances while there is work for them."""
        while self._idle:
            batch = self._take_batch()
            if not batch:
                break
            self._start(self._idle.pop(), batch)
        self._notify_idle()

    def _queues(self) -> Iterator[deque[InferRequest]]:
        """Every queue in serving order: by level, each level's delayed ones last."""
        for level in self._ordered:
            yield level.queue
            yield level.delayed

    def _live_head(self) -> InferRequest | None:
        """The first live request in serving order; drops dead ones before it."""
        now = time.monotonic()
        for queue in self._queues():
            while queue:
                request = queue[0]
                if _alive(request, now):
                    return request
                queue.popleft()
                self._drop(request)
        return None

    def _drop(self, request: InferRequest) -> None:
        """Forget a request that will never run; tell its caller, if still there, why."""
        self._forget(request)
        future = request.future
        if future is not None and not future.done():
            future.set_exception(
                RequestTimeoutError("the request's deadline passed while it was queued")
            )

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
            # Neither full nor a preferred size: within max_queue_delay of the
            # oldest request, send a preferred-size part or wait for more. With
            # no delay configured the deadline is already past: send what is here.
            due_ns = min(r.arrival_ns for r in batch) + self.delay_ns
            if time.monotonic_ns() < due_ns:
                batch = self._trim_to_preferred(batch)
                if not batch:
                    self._wait_for_delay(due_ns)
                    return []
        return self._remove(batch)

    def _gather(self, head: InferRequest) -> tuple[list[InferRequest], int]:
        """Requests that can join ``head``'s batch, in serving order."""
        batch = [head]
        rows = head.rows
        now = time.monotonic()
        for queue in self._queues():
            for request in queue:
                if request is head or not _alive(request, now):
                    continue
                if request.shape_key != head.shape_key:
                    if self.preserve_ordering:
                        # Triton closes the batch here: a later request must not
                        # overtake this one, or responses would leave out of order.
                        return batch, rows
                    continue
                if rows + request.rows > self.max_rows:
                    # Triton does not look further for a smaller request: FIFO.
                    return batch, rows
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
        if self._loop is None:
            return
        if self._delay_timer is not None:
            if self._delay_due_ns <= due_ns:
                return
            self._delay_timer.cancel()
        self._delay_due_ns = due_ns
        delay = max(0.0, (due_ns - time.monotonic_ns()) * 1e-9)
        self._delay_timer = self._loop.call_later(delay, self._delay_elapsed)

    def _delay_elapsed(self) -> None:
        self._delay_timer = None
        self._dispatch()

    def _remove(self, batch: list[InferRequest]) -> list[InferRequest]:
        chosen = set(batch)  # InferRequest compares by identity
        left = len(batch)
        for queue in self._queues():
            if not left:
                break
            taken = sum(1 for r in queue if r in chosen)
            if taken:
                kept = [r for r in queue if r not in chosen]
                queue.clear()
                queue.extend(kept)
                left -= taken
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
        loop = self._loop

        def done(outcome: BatchResult | BaseException) -> None:
            loop.call_soon_threadsafe(self._finish, runner, batch, number, outcome)

        self._workers[id(runner)].submit(batch, done)

    def _finish(
        self,
        runner: Runner,
        batch: list[InferRequest],
        number: int,
        outcome: BatchResult | BaseException,
    ) -> None:
        self._running -= 1
        self._idle.append(runner)
        if self._observer is not None:
            self._observer(
                self._stats, batch, outcome if isinstance(outcome, BaseException) else None
            )
        if self.preserve_ordering:
            self._finished[number] = (batch, outcome)
            while self._next_batch in self._finished:
                self._deliver(*self._finished.pop(self._next_batch))
                self._next_batch += 1
        else:
            self._deliver(batch, outcome)
        self._dispatch()

    def _deliver(self, batch: list[InferRequest], outcome: BatchResult | BaseException) -> None:
        if isinstance(outcome, BaseException):
            if isinstance(outcome, LockgateError):
                error = outcome
            else:
                log.error("batch of %d request(s) failed", len(batch), exc_info=outcome)
                error = LockgateError(f"internal error while running the batch: {outcome!r}")
            for request in batch:
                _resolve(request, error)
            return
        for run in outcome.executions:
            self._stats.record_execution(run.rows, run.input_ns, run.infer_ns, run.output_ns)
        for request, result in zip(batch, outcome.results, strict=True):
            if isinstance(result, LockgateError):
                _resolve(request, result)
                continue
            outputs, run = result
            request.compute_ns = (run.input_ns, run.infer_ns, run.output_ns)
            _resolve(request, outputs)

    # --- lifecycle ------------------------------------------------------------

    @property
    def queued(self) -> int:
        return sum(len(level) for level in self._ordered)

    @property
    def pending(self) -> int:
        """Requests waiting for an instance whose callers still wait for them."""
        return sum(
            1
            for queue in self._queues()
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

    def _notify_idle(self) -> None:
        if self.busy or not self._idle_waiters:
            return
        for waiter in self._idle_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._idle_waiters.clear()

    def close(self) -> None:
        """Refuse new work and fail what is still queued."""
        self._closed = True
        for queue in self._queues():
            while queue:
                request = queue.popleft()
                self._forget(request)
                if request.future is not None and not request.future.done():
                    request.future.set_exception(
                        ModelUnavailableError("model was unloaded before the request ran")
                    )
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        self._notify_idle()
        for worker in self._workers.values():
            worker.stop()


def _alive(request: InferRequest, now: float) -> bool:
    """Someone still waits for the request, and its deadline has not passed."""
    future = request.future
    return (
        future is not None
        and not future.done()
        and (request.deadline is None or now < request.deadline)
    )


def _resolve(request: InferRequest, result: Outputs | BaseException) -> None:
    future = request.future
    if future is None or future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
