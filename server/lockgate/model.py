"""A loaded model version: its effective config, instances, scheduler and stats.

Loading one (sessions, config completion, warmup) is loader.py's job.
"""

from __future__ import annotations

import asyncio
import enum
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
        try:
            outputs = await self.scheduler.run(request)
        except asyncio.CancelledError:
            reason, _ = self.lifecycle.cancellation(request.deadline)
            self.stats.record_failure(reason, time.monotonic_ns() - request.arrival_ns)
            raise
        except LockgateError as exc:
            self.stats.record_failure(exc.reason, time.monotonic_ns() - request.arrival_ns)
            raise
        end = time.monotonic_ns()
        self.stats.record_success(
            request.rows,
            end - request.arrival_ns,
            request.dequeue_ns - request.arrival_ns,
            *request.compute_ns,
        )
        return outputs

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
