"""Server settings (flags and environment) and model configuration loading.

``ServerConfig`` is the one typed object every part of the server reads its
settings from. Model configuration stays Triton's protobuf message
(``ModelConfig``), parsed from ``config.pbtxt`` with protobuf's text format
and auto-completed from the ONNX model the way Triton's ONNX Runtime backend
does it.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from google.protobuf import json_format, text_format

from lockgate.codec import Limits
from lockgate.errors import ModelLoadError
from lockgate.reshape import check_reshape
from lockgate.settings import (
    Alternative,
    non_negative_int,
    port,
    positive_int,
    ratio,
    seconds_or_off,
    setting,
)
from lockgate.stats import BATCH_BUCKETS, DURATION_BUCKETS
from lockgate_client._proto import model_config_pb2 as mc
from lockgate_client.datatypes import CONFIG_TO_WIRE

ModelControlMode = Literal["none", "explicit", "poll"]
SharedMemoryMode = Literal["system", "off"]

#: Triton's default gRPC and metrics ports.
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
#: gRPC's own ceiling for one message (2 GiB - 1).
MAX_MESSAGE_BYTES = 2**31 - 1
#: Default ceiling: room for large batches, yet bounded memory per request.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20

#: Most priority levels a dynamic_batching config may declare (Triton allows
#: any uint64; real configs use a handful).
MAX_PRIORITY_LEVELS = 2**16

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
DEFAULT_MODEL_FILENAME = "model.onnx"


def _cache_config(text: str) -> int:
    from lockgate.cache import parse_cache_config

    return parse_cache_config(text)


def _message_bytes(text: str) -> int:
    number = non_negative_int(text)
    if not 0 < number <= MAX_MESSAGE_BYTES:
        raise ValueError(f"expected a size from 1 to {MAX_MESSAGE_BYTES} bytes")
    return number


def _nice(text: str) -> int:
    number = non_negative_int(text)
    if number > 19:
        raise ValueError("expected a nice increment from 0 to 19")
    return number


def _buckets(text: str) -> tuple[float, ...]:
    return parse_buckets(text)


def _frontends(text: str) -> int:
    """``--frontends``: a count, or ``auto``: one per two usable cores, at most 8.

    Two cores per front end: measured on 2 cores, one front end per core
    leaves the engine too little to batch with (see docs/operations.md).
    """
    if text.strip().lower() == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return max(1, min(8, cores // 2))
    count = int(text)
    if count < 1:
        raise ValueError("expected a number of front ends from 1, or 'auto'")
    return count


@dataclass
class ServerConfig:
    """Everything ``lockgate serve`` can be told, by flag or LOCKGATE_* env.

    Each field is declared once, with its help; settings.py makes the flag
    (``--field-name``) and the environment variable (``LOCKGATE_FIELD_NAME``)
    from it.
    """

    # --- models
    model_repository: list[str] = setting(
        [],
        "Triton-layout repository: DIR/<model>/config.pbtxt, DIR/<model>/<version>/"
        "model.onnx (repeatable; flags replace the environment's list)",
        "models",
        repeatable=True,
        metavar="DIR",
        shown_default="none",
    )
    model_control_mode: ModelControlMode = setting(
        "none",
        "none: load everything at start; explicit: load/unload over gRPC; "
        "poll: reload when the repository changes",
        "models",
        choices=("none", "explicit", "poll"),
    )
    load_models: list[str] = setting(
        [],
        "explicit mode: models to load at start ('*' for all; repeatable)",
        "models",
        flag="load-model",
        repeatable=True,
        metavar="NAME",
        shown_default="none",
    )
    repository_poll_secs: float = setting(
        15.0, "poll mode: seconds between two scans of the repository", "models", metavar="S"
    )
    default_max_batch_size: int = setting(
        4,
        "max_batch_size given to batchable models whose config does not set one",
        "models",
        metavar="N",
    )
    compute_nice: int = setting(
        5,
        "how far below the gRPC threads ONNX Runtime's threads run (a nice increment, "
        "0-19; Linux): where cores are short, requests reach the batcher sooner and "
        "batches grow. 0: equal shares",
        "models",
        _nice,
        metavar="N",
    )
    #: Response cache size; 0: no cache (models that enable one serve uncached).
    response_cache_bytes: int = setting(
        0,
        "response cache size in bytes, for models with response_cache { enable: true }; "
        "0: no cache",
        "models",
        aliases=("--response-cache-byte-size",),  # Triton's older name for the same flag
        metavar="N",
        also=(
            Alternative(
                "--cache-config",
                _cache_config,
                "local,size=N",
                "Triton's form of --response-cache-bytes",
            ),
        ),
    )
    # --- network
    host: str = setting("127.0.0.1", "address to listen on", "network")
    grpc_port: int = setting(DEFAULT_GRPC_PORT, "gRPC port", "network", port, metavar="PORT")
    metrics_port: int = setting(
        DEFAULT_METRICS_PORT, "Prometheus metrics port", "network", port, metavar="PORT"
    )
    metrics: bool = setting(
        True, "serve Prometheus metrics on --metrics-port at /metrics", "network", boolean=True
    )
    grpc_max_connection_age: float | None = setting(
        None,
        "close client connections after this long so load rebalances to new replicas",
        "network",
        seconds_or_off,
        metavar="SECONDS",
        shown_default="off",
    )
    grpc_keepalive_time: float | None = setting(
        None,
        "ping idle client connections this often (clients that vanish are noticed)",
        "network",
        seconds_or_off,
        metavar="SECONDS",
        shown_default="off",
    )
    #: "system": Triton's system shared-memory extension; "off": UNIMPLEMENTED.
    shared_memory: SharedMemoryMode = setting(
        "system",
        "system: clients on this host may pass tensors in POSIX shared memory "
        "regions they register (Triton's system shared-memory extension); off: refuse",
        "network",
        choices=("system", "off"),
    )
    frontends: int = setting(
        1,
        "gRPC front-end processes sharing the port, feeding one engine process that "
        "batches for all (1: a single process, no IPC; auto: one per two cores, up to 8)",
        "network",
        _frontends,
        metavar="N|auto",
    )
    # --- limits
    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES,
        f"largest request or response message (gRPC's ceiling: {MAX_MESSAGE_BYTES})",
        "limits",
        _message_bytes,
        metavar="N",
    )
    max_concurrent_streams: int = setting(
        1024, "concurrent RPCs one client connection may have open", "limits", metavar="N"
    )
    max_tensor_elements: int = setting(
        2**28, "most elements one input tensor may declare", "limits", metavar="N"
    )
    max_bytes_element: int = setting(
        64 * 2**20, "longest BYTES element (in bytes) an input may hold", "limits", metavar="N"
    )
    max_bytes_tensor_elements: int = setting(
        2**20,
        "most elements one BYTES input may hold (each costs a Python object)",
        "limits",
        metavar="N",
    )
    max_stream_requests: int = setting(
        64,
        "requests one ModelStreamInfer stream may have running or answered but unread; "
        "past it the stream is not read (backpressure)",
        "limits",
        positive_int,
        metavar="N",
    )
    max_health_watches: int = setting(
        64,
        "concurrent grpc.health.v1 Watch streams (open to callers without a token)",
        "limits",
        metavar="N",
    )
    # --- lifecycle
    drain_seconds: float = setting(
        30.0,
        "on SIGTERM, time allowed to finish accepted requests before exit",
        "lifecycle",
        metavar="S",
    )
    strict_readiness: bool = setting(
        True,
        "ready only when every model is ready (else: once startup loading is done)",
        "lifecycle",
        boolean=True,
    )
    # --- security
    tls_cert: str | None = setting(
        None, "serve TLS with this certificate (PEM)", "security", metavar="FILE"
    )
    tls_key: str | None = setting(
        None, "the private key of --tls-cert (PEM)", "security", metavar="FILE"
    )
    tls_client_ca: str | None = setting(
        None,
        "require client certificates signed by this CA (mTLS)",
        "security",
        metavar="FILE",
    )
    auth_token_file: str | None = setting(
        None,
        "bearer tokens, one per line: TOKEN [infer|shm|control] (comma-separated scopes)",
        "security",
        metavar="FILE",
    )
    # --- observability
    log_level: str = setting(
        "info",
        "info logs model loads/unloads and each failed request; successes never",
        "observability",
        choices=("debug", "info", "warning", "error", "critical"),
    )
    log_format: Literal["text", "json"] = setting(
        "text", "one line per event, as text or JSON", "observability", choices=("text", "json")
    )
    trace: bool = setting(
        False,
        "OpenTelemetry tracing (exporter and sampling from OTEL_* variables)",
        "observability",
        boolean=True,
    )
    trace_ratio: float = setting(
        1.0,
        "with --trace and no OTEL_TRACES_SAMPLER: the fraction of new traces sampled "
        "(callers' sampling decisions are followed)",
        "observability",
        ratio,
        metavar="R",
    )
    #: Histogram bucket bounds: durations in seconds, batch sizes in rows.
    duration_buckets: tuple[float, ...] = setting(
        DURATION_BUCKETS,
        "bounds in seconds of the request/queue/compute duration histograms",
        "observability",
        _buckets,
        metavar="S,S,...",
    )
    batch_size_buckets: tuple[float, ...] = setting(
        BATCH_BUCKETS,
        "bounds in rows of the batch size histogram",
        "observability",
        _buckets,
        metavar="N,N,...",
    )

    def request_limits(self, max_batch_size: int) -> Limits:
        """The per-request limits of a model with this ``max_batch_size``."""
        return Limits(
            max_batch_size=max_batch_size,
            max_elements=self.max_tensor_elements,
            max_bytes_element=self.max_bytes_element,
            max_bytes_elements=self.max_bytes_tensor_elements,
        )


# --- model configuration ---------------------------------------------------


def parse_model_config(text: str, source: str) -> mc.ModelConfig:
    """Parse Triton text-format config; errors name the file and the line."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except (text_format.ParseError, ValueError) as exc:  # ValueError: an enum number out of range
        raise ModelLoadError(f"{source}: {exc}") from None
    return config


def parse_config_override(text: str, source: str) -> mc.ModelConfig:
    """Parse the JSON config passed to RepositoryModelLoad (Triton's format)."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except (json_format.ParseError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{source}: invalid JSON model config: {exc}") from None
    return config


def read_model_config(model_dir: Path) -> mc.ModelConfig:
    """Read ``config.pbtxt`` if present; an empty config otherwise."""
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        return mc.ModelConfig()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    return parse_model_config(text, str(path))


#: ONNX Runtime's type strings ("tensor(float)") -> model-config enum values.
ORT_TO_CONFIG: dict[str, int] = {
    "tensor(bool)": mc.TYPE_BOOL,
    "tensor(uint8)": mc.TYPE_UINT8,
    "tensor(uint16)": mc.TYPE_UINT16,
    "tensor(uint32)": mc.TYPE_UINT32,
    "tensor(uint64)": mc.TYPE_UINT64,
    "tensor(int8)": mc.TYPE_INT8,
    "tensor(int16)": mc.TYPE_INT16,
    "tensor(int32)": mc.TYPE_INT32,
    "tensor(int64)": mc.TYPE_INT64,
    "tensor(float16)": mc.TYPE_FP16,
    "tensor(float)": mc.TYPE_FP32,
    "tensor(double)": mc.TYPE_FP64,
    "tensor(string)": mc.TYPE_STRING,
    "tensor(bfloat16)": mc.TYPE_BF16,
}


@dataclass(frozen=True)
class OnnxTensor:
    """What the ONNX model itself says about one input or output."""

    name: str
    ort_type: str
    #: -1 for symbolic or unknown dimensions.
    shape: tuple[int, ...]


def _all_batchable(tensors: list[OnnxTensor]) -> bool:
    return all(len(t.shape) >= 1 and t.shape[0] == -1 for t in tensors)


def complete_config(
    config: mc.ModelConfig,
    name: str,
    inputs: list[OnnxTensor],
    outputs: list[OnnxTensor],
    default_max_batch_size: int,
) -> None:
    """Fill what ``config.pbtxt`` left out from the ONNX model, in place.

    Mirrors Triton's ONNX Runtime backend: names, datatypes and dims come from
    the graph; a model whose every input and output has a variable first
    dimension is batchable and gets ``max_batch_size`` =
    ``default_max_batch_size`` (and dynamic batching) when the config does not
    say otherwise.
    """
    config.name = config.name or name
    if config.name != name:
        raise ModelLoadError(
            f"config.pbtxt names model '{config.name}' but its directory is '{name}'"
        )
    if config.platform and config.platform != PLATFORM:
        raise ModelLoadError(
            f"model '{name}': platform '{config.platform}' is not supported; "
            f"Lockgate serves '{PLATFORM}' models"
        )
    if config.backend and config.backend != BACKEND:
        raise ModelLoadError(
            f"model '{name}': backend '{config.backend}' is not supported; use '{BACKEND}'"
        )
    config.platform = PLATFORM
    config.backend = BACKEND
    if not config.default_model_filename:
        config.default_model_filename = DEFAULT_MODEL_FILENAME

    infer_batching = (
        config.max_batch_size == 0
        and not config.input
        and not config.output
        and default_max_batch_size > 0
        and _all_batchable(inputs + outputs)
    )
    if infer_batching:
        config.max_batch_size = default_max_batch_size
        if config.max_batch_size > 1 and config.WhichOneof("scheduling_choice") is None:
            config.dynamic_batching.SetInParent()
    _complete_tensors(config, inputs, is_input=True)
    _complete_tensors(config, outputs, is_input=False)
    if not config.instance_group:
        config.instance_group.add(count=1)
    for group in config.instance_group:
        if group.count == 0:
            group.count = 1
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1


def _complete_tensors(config: mc.ModelConfig, tensors: list[OnnxTensor], is_input: bool) -> None:
    declared = config.input if is_input else config.output
    kind = "input" if is_input else "output"
    by_name = {t.name: t for t in tensors}
    batch_dims = 1 if config.max_batch_size > 0 else 0
    if not declared:
        for tensor in tensors:
            entry = declared.add()
            entry.name = tensor.name
            entry.data_type = _config_type(tensor, config.name)  # type: ignore[assignment]
            _complete_dims(entry, tensor.shape[batch_dims:])
        return
    for entry in declared:
        onnx = by_name.get(entry.name)
        if onnx is None:
            raise ModelLoadError(
                f"model '{config.name}': config {kind} '{entry.name}' is not in the ONNX "
                f"model, which has {sorted(by_name)}"
            )
        want = _config_type(onnx, config.name)
        if entry.data_type == mc.TYPE_INVALID:
            entry.data_type = want  # type: ignore[assignment]
        elif entry.data_type != want:
            raise ModelLoadError(
                f"model '{config.name}': {kind} '{entry.name}' is "
                f"{mc.DataType.Name(entry.data_type)} in config.pbtxt but "
                f"{mc.DataType.Name(want)} in the ONNX model"
            )
        if not entry.dims and not entry.HasField("reshape"):
            _complete_dims(entry, onnx.shape[batch_dims:])
        elif entry.HasField("reshape"):
            _check_model_shape(
                config.name, entry.name, entry.reshape.shape, onnx.shape[batch_dims:]
            )


def _complete_dims(entry: mc.ModelInput | mc.ModelOutput, shape: tuple[int, ...]) -> None:
    """Dims from the ONNX shape; a tensor with no dimension besides the batch
    becomes ``dims: [1]`` with ``reshape { shape: [] }``, as Triton's ONNX
    Runtime backend completes it, so clients get [N, 1] (a scikit-learn label
    output) from both servers."""
    if shape:
        entry.dims.extend(shape)
        return
    entry.dims.append(1)
    entry.reshape.SetInParent()


def _check_model_shape(
    model: str, tensor: str, reshape: Sequence[int], onnx_shape: tuple[int, ...]
) -> None:
    """A reshape must be a shape the ONNX model takes (or makes)."""
    if len(reshape) != len(onnx_shape) or any(
        want != -1 and got != -1 and got != want
        for got, want in zip(reshape, onnx_shape, strict=True)
    ):
        raise ModelLoadError(
            f"model '{model}': tensor '{tensor}' has reshape {list(reshape)} but the ONNX "
            f"model's shape (after any batch dimension) is {list(onnx_shape)}"
        )


def _config_type(tensor: OnnxTensor, model: str) -> int:
    try:
        return ORT_TO_CONFIG[tensor.ort_type]
    except KeyError:
        if not tensor.ort_type.startswith("tensor("):
            raise ModelLoadError(f"model '{model}': {not_a_tensor(tensor)}") from None
        raise ModelLoadError(
            f"model '{model}': tensor '{tensor.name}' has type {tensor.ort_type}, "
            "which the KServe v2 protocol cannot carry"
        ) from None


def not_a_tensor(tensor: OnnxTensor) -> str:
    """Why a sequence or map output cannot be served, and what to do about it."""
    hint = ""
    if tensor.ort_type.startswith("seq(map("):
        # What scikit-learn classifiers converted by skl2onnx output by default.
        hint = (
            "; this is scikit-learn's ZipMap: convert the model with skl2onnx's "
            "options={'zipmap': False} to get the probabilities as a tensor"
        )
    return (
        f"'{tensor.name}' is a {tensor.ort_type}, not a tensor, and the KServe v2 "
        f"protocol carries only tensors{hint}"
    )


def validate_config(config: mc.ModelConfig) -> None:
    """Reject configurations Lockgate would silently mis-serve."""
    name = config.name
    if config.max_batch_size < 0:
        raise ModelLoadError(f"model '{name}': max_batch_size must be >= 0")
    scheduling = config.WhichOneof("scheduling_choice")
    if scheduling == "sequence_batching" and config.response_cache.enable:
        # A stateful model's answer depends on the sequence, not only the inputs.
        raise ModelLoadError(
            f"model '{name}': response_cache cannot be used with sequence_batching"
        )
    if (scheduling == "ensemble_scheduling") != (config.platform == "ensemble"):
        raise ModelLoadError(
            f"model '{name}': ensemble_scheduling and platform \"ensemble\" go together"
        )
    if config.model_transaction_policy.decoupled:
        raise ModelLoadError(f"model '{name}': decoupled models are not supported")
    if config.batch_input or config.batch_output:
        raise ModelLoadError(f"model '{name}': batch_input/batch_output are not supported")
    if scheduling == "dynamic_batching" and config.max_batch_size == 0:
        raise ModelLoadError(
            f"model '{name}': dynamic_batching needs max_batch_size > 0 "
            "(the model must have a batch dimension)"
        )
    batching = config.dynamic_batching
    for size in batching.preferred_batch_size:
        if size <= 0 or size > config.max_batch_size:
            raise ModelLoadError(
                f"model '{name}': preferred_batch_size {size} must be in "
                f"1..max_batch_size ({config.max_batch_size})"
            )
    if batching.priority_levels > MAX_PRIORITY_LEVELS:
        raise ModelLoadError(
            f"model '{name}': priority_levels is {batching.priority_levels}, more than "
            f"Lockgate's limit of {MAX_PRIORITY_LEVELS}"
        )
    if batching.priority_levels and not (
        1 <= (batching.default_priority_level or 1) <= batching.priority_levels
    ):
        raise ModelLoadError(
            f"model '{name}': default_priority_level must be in 1..priority_levels"
        )
    for tensor in list(config.input) + list(config.output):
        if not _wire_type(tensor.data_type, invalid_ok=True):
            raise ModelLoadError(f"model '{name}': tensor '{tensor.name}' has no datatype")
        if any(d < -1 or d == 0 for d in tensor.dims):
            raise ModelLoadError(
                f"model '{name}': tensor '{tensor.name}' dims {list(tensor.dims)} must be "
                "positive or -1"
            )
    for kind, tensors in (("input", config.input), ("output", config.output)):
        names = [t.name for t in tensors]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            # Triton refuses this too: one of the two would silently be ignored.
            raise ModelLoadError(f"model '{name}': {kind} '{twice[0]}' is listed more than once")
    for tensor in list(config.input) + list(config.output):
        if tensor.HasField("reshape"):
            check_reshape(name, tensor.name, tensor.dims, tensor.reshape.shape)
    for group in config.instance_group:
        if group.count < 0:
            raise ModelLoadError(f"model '{name}': instance_group count must be >= 1")
    for sample in config.model_warmup:
        for input_name, warmup in sample.inputs.items():
            if not _wire_type(warmup.data_type, invalid_ok=False) or any(
                d <= 0 for d in warmup.dims
            ):
                raise ModelLoadError(
                    f"model '{name}': warmup '{sample.name}' input '{input_name}' needs a "
                    "datatype and positive dims"
                )


def _wire_type(data_type: int, invalid_ok: bool) -> bool:
    """A datatype the protocol carries; text format also takes enum numbers with no name."""
    if data_type == mc.TYPE_INVALID:
        return invalid_ok
    return data_type in mc.DataType.values() and mc.DataType.Name(data_type) in CONFIG_TO_WIRE


def parse_buckets(text: str) -> tuple[float, ...]:
    """Histogram bounds from ``"0.001,0.01,0.1"``: positive, strictly increasing.

    ``+Inf`` is always added by the exposition, so it need not (and may not) be given.
    """
    try:
        bounds = tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"bucket bounds must be comma-separated numbers, got '{text}'") from None
    if not bounds:
        raise ValueError("give at least one bucket bound")
    if any(not 0 < b < float("inf") for b in bounds):
        raise ValueError(f"bucket bounds must be positive and finite, got '{text}'")
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"bucket bounds must be strictly increasing, got '{text}'")
    return bounds
