"""A loaded model version: its effective config, instances, scheduler and stats."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lockgate.batcher import Outputs, Scheduler
from lockgate.cache import ResponseCache
from lockgate.codec import Limits, TensorSpec
from lockgate.config import ServerConfig, complete_config, validate_config
from lockgate.errors import LoadAbandonedError, LockgateError, ModelLoadError
from lockgate.request import InferRequest
from lockgate.reshape import Reshaper
from lockgate.runner import Runner, plan_instances
from lockgate.stats import ModelStats
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import model_config_pb2 as mc
from lockgate_client.datatypes import CONFIG_TO_WIRE, WIRE_DTYPES

log = logging.getLogger("lockgate.model")


def _specs(tensors: list[mc.ModelInput] | list[mc.ModelOutput]) -> dict[str, TensorSpec]:
    return {
        t.name: TensorSpec(
            name=t.name,
            datatype=CONFIG_TO_WIRE[mc.DataType.Name(t.data_type)],
            dims=tuple(t.dims),
            optional=isinstance(t, mc.ModelInput) and t.optional,
        )
        for t in tensors
    }


class ServerStop:
    """How far the server's stop has got, as the models need to know it.

    One instance per server, shared by the repository and every model version.
    """

    def __init__(self) -> None:
        #: Set at the first SIGTERM/SIGINT: loads in progress give up at their next
        #: step and no new one starts. An Event: load threads read it.
        self.loads_abandoned = threading.Event()
        #: The drain deadline passed: from now on requests are cancelled by the
        #: server stopping under them, not by their callers.
        self.drain_expired = False

    def check_loading(self, name: str) -> None:
        """Raise LoadAbandonedError if the server is stopping (load threads call this)."""
        if self.loads_abandoned.is_set():
            raise LoadAbandonedError(
                f"loading model '{name}' was abandoned: the server is stopping"
            )

    def cancellation(self, deadline: float | None) -> tuple[str, str]:
        """Why a request was cancelled: its failure reason and log message.

        The reason is what the failure statistics and metrics count, so a pod
        cut short by its drain time shows as the server's doing (UNAVAILABLE),
        not as impatient clients.
        """
        if deadline is not None and time.monotonic() >= deadline:
            return "DEADLINE_EXCEEDED", "the caller's deadline passed"
        if self.drain_expired:
            return "UNAVAILABLE", "the server's drain time ran out before the request completed"
        return "CANCELLED", "the caller cancelled"


@dataclass
class ModelVersion:
    """One version of one model, loaded and ready to serve."""

    name: str
    version: str
    config: mc.ModelConfig
    runners: list[Runner]
    scheduler: Scheduler
    stats: ModelStats
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    output_names: frozenset[str]
    output_order: list[str]
    limits: Limits
    output_datatypes: dict[str, str]
    stop: ServerStop = field(default_factory=ServerStop)
    #: The server's response cache when this model's config enables it.
    cache: ResponseCache | None = None

    @classmethod
    def load(
        cls,
        name: str,
        version: int,
        path: Path,
        config: mc.ModelConfig,
        server: ServerConfig,
        has_config_file: bool,
        stop: ServerStop | None = None,
        cache: ResponseCache | None = None,
    ) -> ModelVersion:
        """Create the sessions, complete and check the config. Blocking: call in a thread.

        Raises LoadAbandonedError between two steps (sessions, warmup runs) once
        ``stop`` says the server is stopping: a session being created cannot be
        interrupted, but a long warmup or many instances need not hold up the exit.
        """
        started = time.monotonic()
        stop = stop or ServerStop()
        config = _copy(config)
        if not path.is_file():
            raise ModelLoadError(f"model '{name}' version {version}: {path} does not exist")
        config.name = config.name or name
        validate_config(config)
        placements = plan_instances(config)
        first = Runner(path, config, placements[0])
        complete_config(
            config,
            name,
            first.inputs,
            first.outputs,
            server.default_max_batch_size,
            has_config_file,
        )
        validate_config(config)
        _check_batch_dims(config, first)
        # Instance planning may change once max_batch_size is known; re-plan.
        placements = plan_instances(config)
        runners = [first]
        for placement in placements[1:]:
            stop.check_loading(name)
            runners.append(Runner(path, config, placement))
        reshaper = Reshaper.from_config(config)
        for runner in runners:
            runner.reshaper = reshaper
        stats = ModelStats(
            name=config.name,
            version=str(version),
            duration_buckets=server.duration_buckets,
            batch_buckets=server.batch_size_buckets,
        )
        inputs = _specs(list(config.input))
        outputs = _specs(list(config.output))
        model = cls(
            name=config.name,
            version=str(version),
            config=config,
            runners=runners,
            scheduler=Scheduler(config, runners, stats),
            stats=stats,
            inputs=inputs,
            outputs=outputs,
            output_names=frozenset(outputs),
            output_order=[o.name for o in config.output],
            limits=Limits(
                max_batch_size=config.max_batch_size,
                max_elements=server.max_tensor_elements,
                max_bytes_element=server.max_bytes_element,
                max_bytes_elements=server.max_bytes_tensor_elements,
            ),
            output_datatypes={n: s.datatype for n, s in outputs.items()},
            stop=stop,
            cache=_model_cache(config, cache),
        )
        try:
            model.warmup()
        except BaseException:
            model.close()  # its instance threads would otherwise outlive it
            raise
        stats.load_seconds = time.monotonic() - started
        log.info(
            "loaded model %s version %s: %d instance(s) on %s, max_batch_size %d%s in %.2f s",
            model.name,
            model.version,
            len(runners),
            ",".join(sorted({r.placement.label for r in runners})),
            config.max_batch_size,
            ", dynamic batching" if model.scheduler.max_rows else "",
            stats.load_seconds,
            extra={"event": "model_loaded", "model": model.name, "version": model.version},
        )
        return model

    def warmup(self) -> None:
        """Run the config's ``model_warmup`` samples before reporting ready."""
        for sample in self.config.model_warmup:
            count = max(1, sample.count)
            batch = max(1, sample.batch_size) if self.config.max_batch_size else 0
            feeds = {}
            rng = np.random.default_rng(0)
            for name, spec in sample.inputs.items():
                datatype = CONFIG_TO_WIRE[mc.DataType.Name(spec.data_type)]
                shape = ((batch,) if batch else ()) + tuple(spec.dims)
                if datatype == "BYTES":
                    value = np.full(shape, "0", dtype=np.object_)
                elif spec.random_data and WIRE_DTYPES[datatype].kind == "f":
                    value = rng.random(shape).astype(WIRE_DTYPES[datatype])
                else:
                    value = np.zeros(shape, dtype=WIRE_DTYPES[datatype])
                feeds[name] = value
            for runner in self.runners:
                for _ in range(count):
                    self.stop.check_loading(self.name)
                    try:
                        runner.run(feeds)
                    except LockgateError as exc:
                        raise ModelLoadError(
                            f"model '{self.name}': warmup '{sample.name}' failed: {exc.message}"
                        ) from None

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
            future = self.scheduler.submit(request)
            outputs = await future
        except asyncio.CancelledError:
            reason, _ = self.stop.cancellation(request.deadline)
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

    def metadata(self) -> pb.ModelMetadataResponse:
        batch = (-1,) if self.config.max_batch_size > 0 else ()
        return pb.ModelMetadataResponse(
            name=self.name,
            versions=[self.version],
            platform=self.config.platform,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=s.name, datatype=s.datatype, shape=batch + s.dims
                )
                for s in self.inputs.values()
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=s.name, datatype=s.datatype, shape=batch + s.dims
                )
                for s in self.outputs.values()
            ],
        )

    async def drain(self) -> None:
        await self.scheduler.wait_idle()

    def close(self) -> None:
        self.scheduler.close()


def _model_cache(config: mc.ModelConfig, cache: ResponseCache | None) -> ResponseCache | None:
    if not config.response_cache.enable:
        return None
    if cache is None:
        # Triton loads such a model and serves it uncached; say so once.
        log.warning(
            "model %s enables response_cache but the server has none "
            "(--response-cache-bytes N or --cache-config local,size=N): not caching",
            config.name,
        )
    return cache


def _copy(config: mc.ModelConfig) -> mc.ModelConfig:
    copy = mc.ModelConfig()
    copy.CopyFrom(config)
    return copy


def _check_batch_dims(config: mc.ModelConfig, runner: Runner) -> None:
    """A batching config needs a variable first dimension on every tensor."""
    if config.max_batch_size == 0:
        return
    for tensor in runner.inputs + runner.outputs:
        if not tensor.shape or tensor.shape[0] != -1:
            raise ModelLoadError(
                f"model '{config.name}': max_batch_size is {config.max_batch_size} but "
                f"tensor '{tensor.name}' has shape {list(tensor.shape)}, "
                "with no variable batch dimension"
            )
