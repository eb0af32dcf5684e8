"""A loaded model version: its effective config, instances, scheduler and stats.

Loading one (sessions, config completion, warmup) is loader.py's job.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from dataclasses import dataclass

from lockgate.batcher import Scheduler
from lockgate.cache import ResponseCache
from lockgate.codec import Limits, TensorSpec
from lockgate.ensemble import EnsembleScheduler
from lockgate.errors import LockgateError
from lockgate.lifecycle import Lifecycle
from lockgate.request import InferRequest, Outputs
from lockgate.runner import Runner
from lockgate.sequence import SequenceScheduler
from lockgate.stats import ModelStats
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import model_config_pb2 as mc

log = logging.getLogger("lockgate.model")


class ModelState(enum.StrEnum):
    """A model version's state, with the names RepositoryIndex reports (Triton's)."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(eq=False)
class ModelVersion:
    """One version of one model, loaded and ready to serve (loader.py makes them).

    Compared and hashed by identity: two loads of the same files are two versions.
    """

    name: str
    version: str
    config: mc.ModelConfig
    runners: list[Runner]
    #: The batcher; for an ensemble, the scheduler that runs its steps.
    scheduler: Scheduler | EnsembleScheduler | SequenceScheduler
    stats: ModelStats
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    output_names: frozenset[str]
    output_order: list[str]
    limits: Limits
    output_datatypes: dict[str, str]
    lifecycle: Lifecycle
    #: The server's response cache when this model's config enables it.
    cache: ResponseCache | None = None

    async def infer(self, request: InferRequest) -> Outputs:
        """Answer ``request`` from the cache, or queue it and wait for its batch."""
        if self.cache is not None:
            return await self._infer_cached(request, self.cache)
        return await self._infer(request)

    def submit(self, request: InferRequest) -> asyncio.Future[Outputs]:
        """``infer`` as a future, for callers that answer from a callback (the engine process).

        A plain batcher's own future, with the outcome recorded as it
        resolves: no task per request. Cancelling the future cancels the
        request.
        """
        if self.cache is not None or not isinstance(self.scheduler, Scheduler):
            return asyncio.ensure_future(self.infer(request))
        return self._submit(request, self.scheduler)

    async def _infer_cached(self, request: InferRequest, cache: ResponseCache) -> Outputs:
        start = time.monotonic_ns()
        key = cache.key(self.name, self.version, request)
        hit = cache.lookup(key)
        if hit is not None:
            end = time.monotonic_ns()
            self.stats.record_cache_hit(end - request.arrival_ns, end - start)
            return hit
        lookup_ns = time.monotonic_ns() - start
        outputs = await self._infer(request)
        insert_start = time.monotonic_ns()
        wanted = request.outputs
        cache.insert(key, outputs if wanted is None else {n: outputs[n] for n in wanted})
        self.stats.record_cache_miss(lookup_ns + time.monotonic_ns() - insert_start)
        return outputs

    async def _infer(self, request: InferRequest) -> Outputs:
        """Queue ``request``, wait for its batch, and record the outcome."""
        if isinstance(self.scheduler, Scheduler):
            return await self._submit(request, self.scheduler)
        try:
            outputs = await self.scheduler.run(request)
        except asyncio.CancelledError:
            self._record_cancelled(request)
            raise
        except LockgateError as exc:
            self._record_failure(request, exc)
            raise
        self._record_success(request)
        return outputs

    def _submit(self, request: InferRequest, scheduler: Scheduler) -> asyncio.Future[Outputs]:
        try:
            future = scheduler.submit(request)
        except LockgateError as exc:  # a full queue, an unloading model
            self._record_failure(request, exc)
            raise
        # Before any awaiting task's wake-up: statistics are in place when it resumes.
        future.add_done_callback(functools.partial(self._record, request))
        return future

    def _record(self, request: InferRequest, future: asyncio.Future[Outputs]) -> None:
        if future.cancelled():
            self._record_cancelled(request)
            return
        exc = future.exception()
        if exc is None:
            self._record_success(request)
        elif isinstance(exc, LockgateError):
            self._record_failure(request, exc)

    def _record_success(self, request: InferRequest) -> None:
        self.stats.record_success(
            request.rows,
            time.monotonic_ns() - request.arrival_ns,
            request.dequeue_ns - request.arrival_ns,
            *request.compute_ns,
        )

    def _record_failure(self, request: InferRequest, exc: LockgateError) -> None:
        self.stats.record_failure(exc.reason, time.monotonic_ns() - request.arrival_ns)

    def _record_cancelled(self, request: InferRequest) -> None:
        reason, _ = self.lifecycle.cancellation(request.deadline)
        self.stats.record_failure(reason, time.monotonic_ns() - request.arrival_ns)

    def record_failure(self, reason: str, duration_ns: int) -> None:
        """Count a request that failed before reaching the scheduler (a bad input)."""
        self.stats.record_failure(reason, duration_ns)

    def release(self, outputs: Outputs) -> None:
        pass  # arrays of this process: the garbage collector has them

    def metadata(self) -> pb.ModelMetadataResponse:
        return model_metadata(self.name, self.version, self.config, self.inputs, self.outputs)

    async def drain(self) -> None:
        await self.scheduler.wait_idle()

    def close(self) -> None:
        self.scheduler.close()


def model_metadata(
    name: str,
    version: str,
    config: mc.ModelConfig,
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
) -> pb.ModelMetadataResponse:
    """ModelMetadata's answer for one version (batching models get a -1 first dim)."""
    batch = (-1,) if config.max_batch_size > 0 else ()
    return pb.ModelMetadataResponse(
        name=name,
        versions=[version],
        platform=config.platform,
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(
                name=s.name, datatype=s.datatype, shape=batch + s.dims
            )
            for s in inputs.values()
        ],
        outputs=[
            pb.ModelMetadataResponse.TensorMetadata(
                name=s.name, datatype=s.datatype, shape=batch + s.dims
            )
            for s in outputs.values()
        ],
    )
