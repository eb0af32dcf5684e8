"""What ``Client`` and ``AsyncClient`` share: settings and request building.

Each public call is described once here as a :class:`Call` (which RPC, the
request message, how to read the reply, whether it is idempotent); the two
clients differ only in how they send it (blocking or awaited).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from lockgate_client import codec
from lockgate_client._channel import ChannelSettings, PemSource, make_settings
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import model_config_pb2 as mc
from lockgate_client._retry import RetryPolicy, RetrySchedule
from lockgate_client._shm import SharedOutput
from lockgate_client._tracing import trace_metadata
from lockgate_client.errors import (
    DeadlineExceededError,
    LockgateError,
    UnavailableError,
    error_from_stream_message,
)
from lockgate_client.types import (
    ModelConfig,
    ModelIndex,
    ModelMetadata,
    ModelStatistics,
    Outputs,
    RegionStatus,
    ServerMetadata,
    StreamResponse,
)

T = TypeVar("T")

#: Values ``parameters=`` accepts, sent as the matching InferParameter field.
ParameterValue = bool | int | float | str


@dataclass(frozen=True)
class Call(Generic[T]):
    """One unary RPC ready to send."""

    method: str
    request: Message
    parse: Callable[[Any], T]
    idempotent: bool = True


def _ignore(_: Any) -> None:
    return None


#: A model version as callers give it: ``1`` or ``"1"``; ``""`` lets the server choose.
Version = str | int


def version_text(version: Version) -> str:
    """The wire form of ``version`` (the protocol's field is a string)."""
    # bool first: it is an int subclass, and True is no version.
    if isinstance(version, bool) or not isinstance(version, str | int):
        raise TypeError(
            f'version must be an int or a str, e.g. 1 or "1" ("" lets the server choose), '
            f"not {type(version).__name__}"
        )
    if isinstance(version, int):
        if version < 0:
            raise ValueError(f"version must be 0 or more, not {version}")
        return str(version)
    return version


#: Errors that mean "no answer": a health check reads them as not live / not ready.
NO_ANSWER = (UnavailableError, DeadlineExceededError)


def answered(check: Callable[[], bool]) -> bool:
    """``check()``, or False when the server could not be reached or did not answer."""
    try:
        return check()
    except NO_ANSWER:
        return False


def model_name(model: str) -> str:
    """``model``, checked: a misplaced argument fails here with a message, not in protobuf."""
    if not isinstance(model, str):
        raise TypeError(f"model must be the model's name (a str), not {type(model).__name__}")
    return model


def server_live() -> Call[bool]:
    return Call("ServerLive", pb.ServerLiveRequest(), lambda r: bool(r.live))


def server_ready() -> Call[bool]:
    return Call("ServerReady", pb.ServerReadyRequest(), lambda r: bool(r.ready))


def model_ready(model: str, version: Version) -> Call[bool]:
    request = pb.ModelReadyRequest(name=model_name(model), version=version_text(version))
    return Call("ModelReady", request, lambda r: bool(r.ready))


def server_metadata() -> Call[ServerMetadata]:
    return Call("ServerMetadata", pb.ServerMetadataRequest(), lambda r: r)


def model_metadata(model: str, version: Version) -> Call[ModelMetadata]:
    request = pb.ModelMetadataRequest(name=model_name(model), version=version_text(version))
    return Call("ModelMetadata", request, lambda r: r)


def model_config(model: str, version: Version) -> Call[ModelConfig]:
    request = pb.ModelConfigRequest(name=model_name(model), version=version_text(version))
    return Call("ModelConfig", request, lambda r: r.config)


def model_statistics(model: str, version: Version) -> Call[list[ModelStatistics]]:
    request = pb.ModelStatisticsRequest(name=model_name(model), version=version_text(version))
    return Call("ModelStatistics", request, lambda r: list(r.model_stats))


def repository_index(ready: bool) -> Call[list[ModelIndex]]:
    request = pb.RepositoryIndexRequest(ready=ready)
    return Call("RepositoryIndex", request, lambda r: list(r.models))


def load_model(
    model: str,
    config: str | Mapping[str, Any] | ModelConfig | None,
    files: Mapping[str, bytes] | None,
) -> Call[None]:
    """RepositoryModelLoad; ``config`` travels as JSON, files as ``file:<path>`` bytes."""
    request = pb.RepositoryModelLoadRequest(model_name=model)
    if config is not None:
        if isinstance(config, mc.ModelConfig):
            text = json_format.MessageToJson(config)
        elif isinstance(config, str):
            text = config
        else:
            text = json.dumps(config)
        request.parameters["config"].string_param = text
    for path, content in (files or {}).items():
        request.parameters[f"file:{path}"].bytes_param = content
    # Loading twice is harmless but reloads the model: not retried.
    return Call("RepositoryModelLoad", request, _ignore, idempotent=False)


def unload_model(model: str, unload_dependents: bool) -> Call[None]:
    request = pb.RepositoryModelUnloadRequest(model_name=model)
    if unload_dependents:
        request.parameters["unload_dependents"].bool_param = True
    return Call("RepositoryModelUnload", request, _ignore, idempotent=False)


#: ``infer(outputs=...)``: names, or name -> room in a region (None: inline).
RequestedOutputs = Sequence[str] | Mapping[str, SharedOutput | None]


def infer_request(
    model: str,
    inputs: Mapping[str, Any],
    *,
    outputs: RequestedOutputs | None = None,
    version: Version = "",
    datatypes: Mapping[str, str] | None = None,
    request_id: str = "",
    priority: int | None = None,
    queue_timeout: float | None = None,
    parameters: Mapping[str, ParameterValue] | None = None,
) -> pb.ModelInferRequest:
    """Build a ModelInferRequest with raw inputs (unary and streaming share it)."""
    request = pb.ModelInferRequest(
        model_name=model_name(model), model_version=version_text(version), id=request_id
    )
    codec.encode_inputs(request, inputs, datatypes)
    if outputs is not None:
        for name in outputs:
            entry = request.outputs.add(name=name)
            place = outputs.get(name) if isinstance(outputs, Mapping) else None
            if place is not None:
                codec.set_placement(
                    entry.parameters, place.region.name, place.offset, place.byte_size
                )
    for key, value in (parameters or {}).items():
        _set_parameter(request.parameters[key], value)
    if priority is not None:
        request.parameters["priority"].uint64_param = priority
    if queue_timeout is not None:
        # The protocol's "timeout" parameter is in microseconds.
        request.parameters["timeout"].int64_param = round(queue_timeout * 1_000_000)
    return request


def _set_parameter(param: pb.InferParameter, value: ParameterValue) -> None:
    # bool first: it is an int subclass.
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise TypeError(f"parameter value {value!r} is not bool, int, float or str")


def shared_outputs(outputs: RequestedOutputs | None) -> dict[str, SharedOutput] | None:
    """The outputs to read back from regions, if any."""
    if not isinstance(outputs, Mapping):
        return None
    return {name: place for name, place in outputs.items() if place is not None} or None


def infer_call(
    request: pb.ModelInferRequest, outputs: RequestedOutputs | None = None
) -> Call[Outputs]:
    shared = shared_outputs(outputs)
    if shared is None:
        return Call("ModelInfer", request, codec.decode_outputs, idempotent=False)
    return Call("ModelInfer", request, lambda r: codec.decode_outputs(r, shared), idempotent=False)


def register_shared_memory(name: str, key: str, byte_size: int, offset: int) -> Call[None]:
    request = pb.SystemSharedMemoryRegisterRequest(
        name=name, key=key, offset=offset, byte_size=byte_size
    )
    # A retry after a lost reply would answer ALREADY_EXISTS: not retried.
    return Call("SystemSharedMemoryRegister", request, _ignore, idempotent=False)


def unregister_shared_memory(name: str) -> Call[None]:
    request = pb.SystemSharedMemoryUnregisterRequest(name=name)
    return Call("SystemSharedMemoryUnregister", request, _ignore)


def shared_memory_status(name: str) -> Call[list[RegionStatus]]:
    request = pb.SystemSharedMemoryStatusRequest(name=name)
    return Call("SystemSharedMemoryStatus", request, lambda r: list(r.regions.values()))


def stream_response(message: pb.ModelStreamInferResponse) -> StreamResponse:
    """Read one ModelStreamInferResponse into a StreamResponse."""
    reply = message.infer_response
    if message.error_message:
        error = error_from_stream_message(message.error_message, reply.id)
        return StreamResponse(reply.id, {}, error, reply.model_name, reply.model_version)
    try:
        outputs = codec.decode_outputs(reply)
    except LockgateError as exc:
        exc.request_id = reply.id
        return StreamResponse(reply.id, {}, exc, reply.model_name, reply.model_version)
    return StreamResponse(reply.id, outputs, None, reply.model_name, reply.model_version)


class BaseClient:
    """Settings shared by both clients; see ``Client`` for the arguments."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float | None = None,
        retries: RetryPolicy | int | None = None,
        tls: bool | PemSource = False,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        server_name: str | None = None,
        token: str | None = None,
        compression: str | None = None,
        keepalive: float | None = 60.0,
        metadata: Mapping[str, str] | None = None,
        connections: int = 1,
    ) -> None:
        self._settings: ChannelSettings = make_settings(
            url,
            tls=tls,
            client_cert=client_cert,
            client_key=client_key,
            server_name=server_name,
            token=token,
            compression=compression,
            keepalive=keepalive,
            metadata=metadata,
            connections=connections,
        )
        if self._settings.secure:
            # Read certificates now, so a wrong path fails here, not on first call.
            self._settings.credentials()
        self._timeout = timeout
        self._retry = RetryPolicy.coerce(retries)
        self._metadata = self._settings.call_metadata()
        self._open()

    def _open(self) -> None:
        """Create the channel (the blocking client) or prepare to (the asyncio one)."""

    @property
    def target(self) -> str:
        """The gRPC target name the channel connects to."""
        return self._settings.target

    def _schedule(
        self, call: Call[Any], timeout: float | None, retries: int | None
    ) -> RetrySchedule:
        if retries is not None:
            max_retries = retries
        elif call.idempotent or self._retry.infer:
            max_retries = self._retry.max_retries
        else:
            max_retries = 0
        return RetrySchedule(
            max_retries, self._retry, self._timeout if timeout is None else timeout
        )

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata + trace_metadata()
