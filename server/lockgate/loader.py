"""Loading one model version: sessions, the completed config, specs, warmup.

Blocking (ONNX Runtime builds sessions synchronously): the repository calls
``load_version`` in a worker thread. What can be worked out once per version
is worked out here, so the request path only looks it up: tensor specs,
output order and datatypes, request limits, the scheduler.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from lockgate.batcher import BatchObserver, Scheduler
from lockgate.cache import ResponseCache
from lockgate.codec import TensorSpec
from lockgate.config import (
    ORT_TO_CONFIG,
    ServerConfig,
    complete_config,
    not_a_tensor,
    validate_config,
)
from lockgate.ensemble import (
    EnsembleScheduler,
    Resolve,
    check_steps,
    complete_ensemble_config,
    dependencies,
    plan_steps,
)
from lockgate.errors import LockgateError, ModelLoadError
from lockgate.lifecycle import Lifecycle
from lockgate.model import ModelVersion
from lockgate.reshape import Reshaper
from lockgate.runner import Runner, plan_instances
from lockgate.sequence import (
    SequenceScheduler,
    batching_view,
    controls_of,
    hidden_tensors,
    states_of,
)
from lockgate.stats import ModelStats
from lockgate_client._proto import model_config_pb2 as mc
from lockgate_client.datatypes import CONFIG_TO_WIRE, WIRE_DTYPES

log = logging.getLogger("lockgate.model")


def load_version(
    name: str,
    version: int,
    path: Path,
    config: mc.ModelConfig,
    server: ServerConfig,
    lifecycle: Lifecycle,
    cache: ResponseCache | None = None,
    observer: BatchObserver | None = None,
) -> ModelVersion:
    """Create the sessions, complete and check the config, warm up. Blocking.

    Raises LoadAbandonedError between two steps (sessions, warmup runs) once
    ``lifecycle`` says the server is stopping: a session being created cannot be
    interrupted, but a long warmup or many instances need not hold up the exit.
    """
    started = time.monotonic()
    config = _copy(config)
    if not path.is_file():
        raise ModelLoadError(f"model '{name}' version {version}: {path} does not exist")
    config.name = config.name or name
    validate_config(config)
    placements = plan_instances(config, server.compute_nice)
    first = Runner(path, config, placements[0])
    # Control and state tensors are the server's to feed and keep, never the client's.
    hidden_in, hidden_out = hidden_tensors(config)
    complete_config(
        config,
        name,
        [t for t in first.inputs if t.name not in hidden_in],
        [t for t in first.outputs if t.name not in hidden_out],
        server.default_max_batch_size,
    )
    validate_config(config)
    if config.HasField("sequence_batching"):
        _check_sequence_tensors(config, first)
    _check_batch_dims(config, first)
    # Instance planning may change once max_batch_size is known; re-plan.
    placements = plan_instances(config, server.compute_nice)
    runners = [first]
    for placement in placements[1:]:
        lifecycle.check_loading(name)
        runners.append(Runner(path, config, placement))
    reshaper = Reshaper.from_config(config)
    for runner in runners:
        runner.reshaper = reshaper
    stats = _stats(config, version, server)
    model = _assemble(
        config,
        version,
        runners,
        _scheduler(config, runners, stats, observer),
        stats,
        server,
        lifecycle,
        cache,
    )
    try:
        warmup(model)
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


def load_ensemble(
    name: str,
    version: int,
    config: mc.ModelConfig,
    server: ServerConfig,
    resolve: Resolve,
    lifecycle: Lifecycle,
    cache: ResponseCache | None = None,
) -> ModelVersion:
    """An ensemble version: its plan checked against the composing models loaded now."""
    started = time.monotonic()
    config = _copy(config)
    complete_ensemble_config(config, name)
    validate_config(config)
    steps = check_steps(config, plan_steps(config), resolve)
    stats = _stats(config, version, server)
    output_order = [o.name for o in config.output]
    scheduler = EnsembleScheduler(config.name, steps, output_order, stats, resolve)
    model = _assemble(config, version, [], scheduler, stats, server, lifecycle, cache)
    stats.load_seconds = time.monotonic() - started
    log.info(
        "loaded ensemble %s version %s: %d step(s) over %s",
        model.name,
        model.version,
        len(steps),
        ", ".join(dependencies(config)),
        extra={"event": "model_loaded", "model": model.name, "version": model.version},
    )
    return model


def _stats(config: mc.ModelConfig, version: int, server: ServerConfig) -> ModelStats:
    return ModelStats(
        name=config.name,
        version=str(version),
        duration_buckets=server.duration_buckets,
        batch_buckets=server.batch_size_buckets,
    )


def _assemble(
    config: mc.ModelConfig,
    version: int,
    runners: list[Runner],
    scheduler: Scheduler | EnsembleScheduler | SequenceScheduler,
    stats: ModelStats,
    server: ServerConfig,
    lifecycle: Lifecycle,
    cache: ResponseCache | None,
) -> ModelVersion:
    """A loaded version around its scheduler: the specs and limits every kind shares."""
    outputs = tensor_specs(list(config.output))
    return ModelVersion(
        name=config.name,
        version=str(version),
        config=config,
        runners=runners,
        scheduler=scheduler,
        stats=stats,
        inputs=tensor_specs(list(config.input)),
        outputs=outputs,
        output_names=frozenset(outputs),
        output_order=[o.name for o in config.output],
        limits=server.request_limits(config.max_batch_size),
        output_datatypes={n: s.datatype for n, s in outputs.items()},
        lifecycle=lifecycle,
        cache=_model_cache(config, cache),
    )


def warmup(model: ModelVersion) -> None:
    """Run the config's ``model_warmup`` samples before the version reports ready."""
    for sample in model.config.model_warmup:
        count = max(1, sample.count)
        batch = max(1, sample.batch_size) if model.config.max_batch_size else 0
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
        for runner in model.runners:
            for _ in range(count):
                model.lifecycle.check_loading(model.name)
                try:
                    runner.run(feeds)
                except LockgateError as exc:
                    raise ModelLoadError(
                        f"model '{model.name}': warmup '{sample.name}' failed: {exc.message}"
                    ) from None


def _scheduler(
    config: mc.ModelConfig,
    runners: list[Runner],
    stats: ModelStats,
    observer: BatchObserver | None,
) -> Scheduler | SequenceScheduler:
    if not config.HasField("sequence_batching"):
        return Scheduler(config, runners, stats, observer)
    return SequenceScheduler(config, Scheduler(batching_view(config), runners, stats, observer))


def _check_sequence_tensors(config: mc.ModelConfig, runner: Runner) -> None:
    """Every control and state names a tensor of the ONNX model, of the right type."""
    name = config.name
    onnx_inputs = {t.name: t for t in runner.inputs}
    onnx_outputs = {t.name: t for t in runner.outputs}
    declared = {t.name for t in config.input} | {t.name for t in config.output}
    wanted: list[tuple[str, str, str, object]] = []
    for control in controls_of(config):
        wanted.append(("control input", control.name, "input", control.dtype))
    for state in states_of(config):
        wanted.append((f"state '{state.input_name}' input", state.input_name, "input", state.dtype))
        wanted.append(
            (f"state '{state.input_name}' output", state.output_name, "output", state.dtype)
        )
    for what, tensor, kind, dtype in wanted:
        if tensor in declared:
            raise ModelLoadError(
                f"model '{name}': {what} '{tensor}' is also listed as a model {kind}; the "
                "server feeds it, so leave it out of input/output"
            )
        onnx = (onnx_inputs if kind == "input" else onnx_outputs).get(tensor)
        if onnx is None:
            have = sorted(onnx_inputs if kind == "input" else onnx_outputs)
            raise ModelLoadError(
                f"model '{name}': {what} '{tensor}' is not an {kind} of the ONNX model, "
                f"which has {have}"
            )
        onnx_type = mc.DataType.Name(ORT_TO_CONFIG.get(onnx.ort_type, mc.TYPE_INVALID))
        want = WIRE_DTYPES[CONFIG_TO_WIRE[onnx_type]] if onnx_type in CONFIG_TO_WIRE else None
        if want != dtype:
            raise ModelLoadError(
                f"model '{name}': {what} '{tensor}' is {onnx.ort_type} in the ONNX model, "
                f"but the config gives {dtype}"
            )


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
        if not tensor.ort_type.startswith("tensor("):
            # Its shape is empty because it has none: say what it really is.
            raise ModelLoadError(f"model '{config.name}': {not_a_tensor(tensor)}")
        if not tensor.shape or tensor.shape[0] != -1:
            raise ModelLoadError(
                f"model '{config.name}': max_batch_size is {config.max_batch_size} but "
                f"tensor '{tensor.name}' has shape {list(tensor.shape)}, "
                "with no variable batch dimension"
            )


def tensor_specs(tensors: list[mc.ModelInput] | list[mc.ModelOutput]) -> dict[str, TensorSpec]:
    """The hot path's view of a config's inputs or outputs (front ends build theirs too)."""
    return {
        t.name: TensorSpec(
            name=t.name,
            datatype=CONFIG_TO_WIRE[mc.DataType.Name(t.data_type)],
            dims=tuple(t.dims),
            optional=isinstance(t, mc.ModelInput) and t.optional,
        )
        for t in tensors
    }
