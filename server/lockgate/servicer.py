"""GRPCInferenceService: protobuf in, protobuf out, nothing else.

Each RPC asks the ``Engine`` (engine.py) for the model, lets the codec
decode, awaits the model, and encodes; it never touches the repository.
``LockgateError``s become gRPC statuses in ``_abort``, the one place that
maps error kinds to codes; streaming RPCs report them in-band instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from lockgate import __version__
from lockgate.codec import decode_request, encode_response
from lockgate.config import ServerConfig
from lockgate.engine import Engine, ServedModel
from lockgate.errors import (
    InternalError,
    InvalidInputError,
    LockgateError,
    ModelUnavailableError,
    NotAllowedError,
    UnsupportedError,
    clip,
)
from lockgate.lifecycle import Lifecycle
from lockgate.request import InferRequest, Outputs
from lockgate.shm import Lease, Placement, SharedMemoryRegistry
from lockgate.tracing import RequestTrace, Tracer
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as service
from lockgate_client.datatypes import WIRE_DTYPES

log = logging.getLogger("lockgate.servicer")

#: ServerMetadata extensions: only those Lockgate really implements.
EXTENSIONS = [
    "model_repository",
    "model_configuration",
    "schedule_policy",
    "statistics",
    "parameters",
]

Context = grpc.aio.ServicerContext[Any, Any]

#: gRPC keeps deadlines in whole milliseconds and was measured cancelling a
#: call up to 1.1 ms before the deadline time_remaining() implies; without
#: this slack such a call would be counted CANCELLED, not DEADLINE_EXCEEDED.
DEADLINE_SLACK_S = 0.005


Unary = Callable[["Servicer", Any, Context], Awaitable[Any]]


def _status(method: Unary) -> Unary:
    """Turn LockgateErrors raised by a unary RPC into its gRPC status."""

    @wraps(method)
    async def wrapper(self: Servicer, request: Any, context: Context) -> Any:
        try:
            return await method(self, request, context)
        except LockgateError as exc:
            await _abort(context, exc)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # a bug of ours: say so, keep serving
            log.exception("internal error in %s", method.__name__)
            await _abort(context, InternalError(f"internal error: {exc}"))
        raise AssertionError("unreachable: abort raises")

    return wrapper


async def _abort(context: Context, error: LockgateError) -> None:
    await context.abort(error.code, error.message)


def in_band(error: LockgateError) -> str:
    """Stream errors carry no status code, so the message starts with it."""
    return f"[{error.code.name}] {error.message}"


class Servicer(service.GRPCInferenceServiceServicer):
    """Lockgate's implementation of ``inference.GRPCInferenceService``."""

    def __init__(
        self,
        engine: Engine,
        lifecycle: Lifecycle,
        config: ServerConfig,
        tracer: Tracer | None = None,
        shared_memory: SharedMemoryRegistry | None = None,
    ) -> None:
        self._engine = engine
        self._lifecycle = lifecycle
        self._control_enabled = config.model_control_mode == "explicit"
        self._max_stream_requests = config.max_stream_requests
        #: None when tracing is off: the one check the request path pays.
        self._tracer = tracer
        #: None when --shared-memory off: the extension answers UNIMPLEMENTED.
        self._shared_memory = shared_memory
        self._extensions = EXTENSIONS + (
            ["system_shared_memory"] if shared_memory is not None else []
        )

    # --- health and metadata ---------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self._lifecycle.ready and not self._lifecycle.draining)

    @_status
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        # A model that is missing or not ready is an answer (ready=false), as in
        # Triton; a malformed version is the caller's mistake (INVALID_ARGUMENT).
        ready = await self._engine.model_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready and not self._lifecycle.draining)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> Any:
        return pb.ServerMetadataResponse(
            name="lockgate", version=__version__, extensions=self._extensions
        )

    @_status
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        return await self._engine.metadata(request.name, request.version)

    @_status
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> Any:
        config = await self._engine.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=config)

    @_status
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> Any:
        stats = await self._engine.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=stats)

    # --- inference ----------------------------------------------------------------

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        trace: RequestTrace | None = None,
    ) -> Any:
        if self._lifecycle.draining:
            # Shutting down: finish what was accepted, take nothing new (not logged:
            # clients that keep sending would flood the log during the drain).
            raise ModelUnavailableError("the server is shutting down; retry on another replica")
        start = time.monotonic_ns()
        try:
            engine = self._engine
            model = engine.model(request.model_name, request.model_version)
            if model is None:  # not in a front end's cache: the engine process decides
                model = await engine.lookup(request.model_name, request.model_version)
            if _heavy_request(request, model):
                # Seconds of work for a large request: in a thread, so that
                # nobody else's request (nor a health check) waits behind it.
                decoded = await asyncio.to_thread(
                    _decode, model, request, start, self._shared_memory
                )
            else:
                decoded = _decode(model, request, start, self._shared_memory)
            outputs: Outputs | None = None
            try:
                decoded.deadline = deadline
                if trace is not None:
                    trace.attach(decoded)
                outputs = await model.infer(decoded)
                encode = functools.partial(
                    encode_response,
                    model.name,
                    decoded.served_version or model.version,
                    decoded.request_id,
                    outputs,
                    model.output_datatypes,
                    decoded.outputs or model.output_order,
                    _shared(decoded),
                )
                if _heavy_outputs(outputs):
                    return await asyncio.to_thread(encode)
                return encode()
            finally:
                if outputs is not None:
                    model.release(outputs)
                if decoded.lease is not None:
                    # Views first: an unregistered region unmaps with its last lease.
                    decoded.inputs = {}
                    decoded.lease.release()
        except LockgateError as exc:
            _log_failure(request, exc.reason, exc.message)
            raise
        except asyncio.CancelledError:
            # The caller hung up, its deadline passed, or the drain time ran out
            # and the server stopped under the request.
            reason, message = self._lifecycle.cancellation(deadline)
            _log_failure(request, reason, message)
            if trace is not None:
                trace.cancelled = (reason, message)
            raise

    @_status
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> Any:
        remaining = context.time_remaining()
        deadline = (
            time.monotonic() + remaining - DEADLINE_SLACK_S if remaining is not None else None
        )
        if self._tracer is not None:
            metadata = context.invocation_metadata()
            return await self._tracer.traced("ModelInfer", self._infer, request, deadline, metadata)
        return await self._infer(request, deadline)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently; each answer (or in-band error) as soon as ready.

        Backpressure: at most ``max_stream_requests`` requests are running or
        answered-but-unsent at a time; past that the stream is not read, so a
        client that sends without reading its answers is held back by HTTP/2
        flow control instead of growing the server's memory.
        """
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        # One slot per request from reading it until its answer is handed to gRPC.
        slots = asyncio.Semaphore(self._max_stream_requests)
        tracer = self._tracer
        metadata = context.invocation_metadata() if tracer is not None else None

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                if tracer is not None:
                    result = await tracer.traced(
                        "ModelStreamInfer", self._infer, request, None, metadata
                    )
                else:
                    result = await self._infer(request, None)
                responses.put_nowait(pb.ModelStreamInferResponse(infer_response=result))
            except LockgateError as exc:
                responses.put_nowait(_stream_error(request, exc))
            except Exception as exc:  # a bug of ours: this request fails, the stream goes on
                log.exception("internal error in ModelStreamInfer")
                responses.put_nowait(
                    _stream_error(request, InternalError(f"internal error: {exc}"))
                )

        broken: list[LockgateError] = []

        async def read() -> None:
            try:
                await slots.acquire()
                async for request in request_iterator:
                    if isinstance(request, Unparsable):
                        raise request.error
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    await slots.acquire()
                if running:
                    await asyncio.gather(*running, return_exceptions=True)
            except LockgateError as exc:  # the stream itself is broken: end it
                broken.append(exc)
            finally:
                responses.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                # Returns once gRPC has taken the message: a client that does
                # not read holds it here, and with it the slot.
                yield response
                slots.release()
            if broken:
                await _abort(context, broken[0])
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # --- repository ----------------------------------------------------------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> Any:
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=name, version=version, state=state, reason=reason
                )
                for name, version, state, reason in await self._engine.index(request.ready)
            ]
        )

    @_status
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> Any:
        self._check_control("load")
        config_json: str | None = None
        files: dict[str, bytes] = {}
        for key, value in request.parameters.items():
            if key == "config":
                config_json = value.string_param
            elif key.startswith("file:"):
                files[key.removeprefix("file:")] = value.bytes_param
            else:
                raise InvalidInputError(f"unknown load parameter '{key}'")
        await self._engine.load(request.model_name, config_json, files or None)
        return pb.RepositoryModelLoadResponse()

    @_status
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> Any:
        self._check_control("unload")
        dependents = request.parameters.get("unload_dependents")
        if dependents is not None and dependents.WhichOneof("parameter_choice") != "bool_param":
            raise InvalidInputError("parameter 'unload_dependents' must be a bool")
        await self._engine.unload(
            request.model_name, unload_dependents=dependents is not None and dependents.bool_param
        )
        return pb.RepositoryModelUnloadResponse()

    def _check_control(self, action: str) -> None:
        if not self._control_enabled:
            raise NotAllowedError(
                f"cannot {action} models: start the server with --model-control-mode explicit"
            )

    # --- system shared memory ---------------------------------------------------

    def _regions(self) -> SharedMemoryRegistry:
        if self._shared_memory is None:
            raise UnsupportedError(
                "system shared memory is off on this server (--shared-memory off); "
                "send tensors inline"
            )
        return self._shared_memory

    @_status
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> Any:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._regions().status(request.name):
            status = response.regions[region.name]
            status.name = region.name
            status.key = region.key
            status.offset = region.offset
            status.byte_size = region.byte_size
        return response

    @_status
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> Any:
        await self._regions().add(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_status
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> Any:
        await self._regions().remove(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # --- not implemented -----------------------------------------------------------

    async def _cuda_unsupported(self, context: Context) -> Any:
        await _abort(
            context,
            UnsupportedError(
                "CUDA shared memory is not supported by Lockgate; use system shared memory "
                "(SystemSharedMemoryRegister) or send tensors inline"
            ),
        )

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        return await self._cuda_unsupported(context)

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        return await self._cuda_unsupported(context)

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> Any:
        # No CUDA region can ever be registered, and Triton answers success for
        # names it does not hold: perf_analyzer unregisters both kinds at exit.
        return pb.CudaSharedMemoryUnregisterResponse()

    async def TraceSetting(self, request: Any, context: Context) -> Any:
        await _abort(
            context,
            UnsupportedError(
                "trace settings cannot be changed over gRPC; Lockgate traces with "
                "OpenTelemetry, configured by --trace and OTEL_* environment variables"
            ),
        )

    async def LogSettings(self, request: Any, context: Context) -> Any:
        await _abort(
            context,
            UnsupportedError(
                "log settings cannot be changed over gRPC; use --log-level and --log-format"
            ),
        )


def _stream_error(request: pb.ModelInferRequest, error: LockgateError) -> Any:
    """The in-band answer to a stream request that failed."""
    return pb.ModelStreamInferResponse(
        error_message=in_band(error),
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


def _log_failure(request: pb.ModelInferRequest, reason: str, message: str) -> None:
    """One line per failed inference (never per success: the hot path stays quiet).

    INFO, not WARNING: nearly every failure is the caller's (a bad input, an
    unknown model, a deadline) and a misbehaving client must not flood the
    warnings; errors of the server itself are logged at ERROR where they occur.
    """
    request_id, model = clip(request.id), clip(request.model_name)
    log.info(
        "inference request %r to %s failed: %s: %s",
        request_id,
        model,
        reason,
        message,
        extra={
            "event": "request_failed",
            "request_id": request_id,
            "model": model,
            "version": clip(request.model_version),
            "reason": reason,
        },
    )


#: Decoding or encoding more than this runs in a thread: BYTES elements and
#: typed contents cost Python work per element, raw fixed-size tensors only a
#: copy at most.
HEAVY_ELEMENT_BYTES = 64 * 2**10
HEAVY_RAW_BYTES = 16 * 2**20


def _heavy_request(request: pb.ModelInferRequest, model: ServedModel) -> bool:
    """Whether decoding ``request`` is worth a trip to a worker thread."""
    tensors = request.inputs
    if len(tensors) > len(model.inputs):
        return False  # refused at once by the decoder
    raw = request.raw_input_contents
    if len(raw) == len(tensors):
        for index, tensor in enumerate(tensors):
            if tensor.datatype == "BYTES":
                if len(raw[index]) > HEAVY_ELEMENT_BYTES:
                    return True
                continue
            # From the shape, not len(raw[index]): each access to a bytes
            # field copies it, and a 600 KB image would be copied once more.
            dtype = WIRE_DTYPES.get(tensor.datatype)
            if dtype is not None and math.prod(tensor.shape) * dtype.itemsize > HEAVY_RAW_BYTES:
                return True
        return False
    return any(tensor.contents.ByteSize() > HEAVY_ELEMENT_BYTES for tensor in tensors)


def _heavy_outputs(outputs: dict[str, Any]) -> bool:
    """Whether encoding ``outputs`` is worth a trip to a worker thread."""
    total = 0
    for array in outputs.values():
        if array.dtype.kind == "O" and array.nbytes > HEAVY_ELEMENT_BYTES:
            return True  # object pointers: a BYTES output of more than 8192 elements
        total += array.nbytes
    return total > HEAVY_RAW_BYTES


def _decode(
    model: ServedModel,
    request: pb.ModelInferRequest,
    start_ns: int,
    shared_memory: SharedMemoryRegistry | None,
) -> InferRequest:
    """Decode against the model's specs; a bad request counts as a failure."""
    try:
        decoded = decode_request(
            request, model.inputs, model.output_names, model.limits, shared_memory
        )
    except LockgateError as exc:
        model.record_failure(exc.reason, time.monotonic_ns() - start_ns)
        raise
    decoded.arrival_ns = start_ns
    return decoded


def _shared(decoded: InferRequest) -> tuple[Lease, dict[str, Placement]] | None:
    """What ``encode_response`` needs to write outputs into shared memory."""
    if decoded.lease is None or decoded.output_placements is None:
        return None
    return decoded.lease, decoded.output_placements


# --- registration ----------------------------------------------------------------------


class Unparsable:
    """Stands in for a request whose bytes are not the message the RPC takes."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidInputError) -> None:
        self.error = error


def add_to_server(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` so that requests that do not parse get INVALID_ARGUMENT.

    grpc answers a request its deserializer rejects with UNKNOWN, the code of
    a bug of ours; the checked handlers report the caller's mistake instead.
    """
    service.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, _CheckedRegistrar(server)
    )


class _CheckedRegistrar:
    """Receives the generated code's handlers; registers checked ones."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        del handlers  # the same methods, registered checked below

    def add_registered_method_handlers(
        self, name: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        checked = {method: _checked(handler) for method, handler in handlers.items()}
        generic = grpc.method_handlers_generic_handler(name, checked)
        self._server.add_generic_rpc_handlers((generic,))
        self._server.add_registered_method_handlers(name, checked)  # type: ignore[attr-defined]


def _checked(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    parse = handler.request_deserializer
    assert parse is not None

    def checked_parse(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Unparsable(InvalidInputError(f"the request does not parse: {exc}"))

    serialize = handler.response_serializer
    if handler.request_streaming:  # ModelStreamInfer checks what it reads
        return grpc.stream_stream_rpc_method_handler(
            handler.stream_stream,  # type: ignore[arg-type]
            request_deserializer=checked_parse,
            response_serializer=serialize,
        )
    behavior: Any = handler.unary_unary  # a coroutine function: grpc's stubs know no aio
    assert behavior is not None

    async def unary(request: Any, context: Context) -> Any:
        if isinstance(request, Unparsable):
            await _abort(context, request.error)
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary,  # type: ignore[arg-type]
        request_deserializer=checked_parse,
        response_serializer=serialize,
    )
