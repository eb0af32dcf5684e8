"""The asyncio client: ``AsyncClient`` and its inference ``AsyncStream``.

The twin of :mod:`lockgate_client.client`: same arguments, same results, same
errors, with ``await``. Requests are built by the same code (``_base``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from lockgate_client import _base
from lockgate_client._base import (
    BaseClient,
    Call,
    ParameterValue,
    RequestedOutputs,
    Version,
)
from lockgate_client._proto import inference_service_pb2_grpc as service
from lockgate_client._shm import SharedMemoryRegion
from lockgate_client.errors import DeadlineExceededError, LockgateError, error_from_rpc
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

__all__ = ["AsyncClient", "AsyncStream"]

T = TypeVar("T")


class AsyncClient(BaseClient):
    """An asyncio client; arguments and methods as :class:`~lockgate_client.Client`.

    The channel opens on first use inside the running event loop; use the
    client as ``async with``, or ``await client.close()``. Share one instance
    between tasks of the same loop.
    """

    _channels: list[grpc.aio.Channel]
    _stubs: list[Any]

    def _open(self) -> None:
        # grpc.aio channels belong to the loop they are created in: wait for it.
        self._channels = []
        self._stubs = []
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def _stub(self) -> Any:
        """The stub of the channel whose turn it is; the channels open on first use."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if not self._stubs or (loop is not None and loop is not self._loop):
            # A channel belongs to the loop that made it: a client used again
            # under a new loop (a second asyncio.run) needs new channels, or
            # every call fails with "Event loop is closed".
            self._channels = [
                self._settings.aio_channel() for _ in range(self._settings.connections)
            ]
            self._stubs = [
                service.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
                for channel in self._channels
            ]
            self._loop = loop
        stubs = self._stubs
        if len(stubs) == 1:
            return stubs[0]
        self._turn = (self._turn + 1) % len(stubs)
        return stubs[self._turn]

    async def close(self) -> None:
        """Close the channels; calls in flight are cancelled."""
        # Channels of a loop that has ended cannot be closed from this one; they are dropped.
        if self._loop is asyncio.get_running_loop():
            for channel in self._channels:
                await channel.close(None)
        self._channels = []
        self._stubs = []

    async def __aenter__(self) -> AsyncClient:
        self._stub  # noqa: B018 - open the channel in the caller's loop
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _invoke(self, call: Call[T], timeout: float | None, retries: int | None = None) -> T:
        schedule = self._schedule(call, timeout, retries)
        method = getattr(self._stub, call.method)
        while True:
            try:
                reply = await method(
                    call.request, timeout=schedule.remaining(), metadata=self._call_metadata()
                )
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                delay = schedule.next_delay(error)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)
            else:
                return call.parse(reply)

    # Inference

    async def infer(
        self,
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
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Outputs:
        """Run one inference; see ``Client.infer``."""
        request = _base.infer_request(
            model,
            inputs,
            outputs=outputs,
            version=version,
            datatypes=datatypes,
            request_id=request_id,
            priority=priority,
            queue_timeout=queue_timeout,
            parameters=parameters,
        )
        return await self._invoke(_base.infer_call(request, outputs), timeout, retries)

    def stream(
        self, model: str, *, version: Version = "", timeout: float | None = None
    ) -> AsyncStream:
        """Open a bidirectional inference stream; see ``Client.stream``."""
        model, version = _base.model_name(model), _base.version_text(version)
        call = self._stub.ModelStreamInfer(timeout=timeout, metadata=self._call_metadata())
        return AsyncStream(call, model, version)

    # Health

    async def is_live(self, *, timeout: float | None = None) -> bool:
        """Whether the server is live; False when it cannot be reached (see ``Client.is_live``)."""
        try:
            return await self._invoke(_base.server_live(), timeout, retries=0)
        except _base.NO_ANSWER:
            return False

    async def is_ready(
        self, model: str | None = None, version: Version = "", *, timeout: float | None = None
    ) -> bool:
        """Whether the server (or, given ``model``, that model) is ready; False when unreachable."""
        try:
            return await self._ready(model, version, timeout)
        except _base.NO_ANSWER:
            return False

    async def _ready(self, model: str | None, version: Version, timeout: float | None) -> bool:
        call = _base.server_ready() if model is None else _base.model_ready(model, version)
        return await self._invoke(call, timeout, retries=0)

    async def wait_ready(self, model: str | None = None, *, timeout: float = 30.0) -> None:
        """Wait until :meth:`is_ready` is true; see ``Client.wait_ready``."""
        deadline = time.monotonic() + timeout
        last: LockgateError | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = f": last error {last}" if last else ""
                raise DeadlineExceededError(f"not ready after {timeout} s{detail}")
            try:
                if await self._ready(model, "", min(remaining, 5.0)):
                    return
            except LockgateError as exc:
                last = exc
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    # Metadata and statistics

    async def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        """The server's name, version and protocol extensions."""
        return await self._invoke(_base.server_metadata(), timeout)

    async def metadata(
        self, model: str, version: Version = "", *, timeout: float | None = None
    ) -> ModelMetadata:
        """A model's versions, platform, inputs and outputs."""
        return await self._invoke(_base.model_metadata(model, version), timeout)

    async def config(
        self, model: str, version: Version = "", *, timeout: float | None = None
    ) -> ModelConfig:
        """A model's configuration (Triton's ``ModelConfig`` message)."""
        return await self._invoke(_base.model_config(model, version), timeout)

    async def statistics(
        self, model: str = "", version: Version = "", *, timeout: float | None = None
    ) -> list[ModelStatistics]:
        """Inference statistics, one entry per model version."""
        return await self._invoke(_base.model_statistics(model, version), timeout)

    # Repository

    async def models(
        self, *, ready: bool = False, timeout: float | None = None
    ) -> list[ModelIndex]:
        """The model repository's index."""
        return await self._invoke(_base.repository_index(ready), timeout)

    async def load(
        self,
        model: str,
        *,
        config: str | Mapping[str, Any] | ModelConfig | None = None,
        files: Mapping[str, bytes] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Load or reload ``model``; see ``Client.load``."""
        await self._invoke(_base.load_model(model, config, files), timeout)

    async def unload(
        self, model: str, *, unload_dependents: bool = False, timeout: float | None = None
    ) -> None:
        """Unload ``model``."""
        await self._invoke(_base.unload_model(model, unload_dependents), timeout)

    # System shared memory

    async def create_shared_memory(
        self, name: str, byte_size: int, *, timeout: float | None = None
    ) -> SharedMemoryRegion:
        """Create a shared-memory region of ``byte_size`` bytes and register it as ``name``.

        The server must run on this host. Place inputs with ``region.write(array)``
        and room for outputs with ``region.output(nbytes)``, then pass them to
        :meth:`infer`; outputs in the region come back as views of it.
        ``region.close()`` (or ``with``) unregisters it, unmaps and removes it.
        Closing the region does not unregister it (close() cannot await):
        ``await client.unregister_shared_memory(region)`` first.
        """
        region = SharedMemoryRegion(name, byte_size)
        try:
            await self.register_shared_memory(region, timeout=timeout)
        except BaseException:
            region.close()
            raise
        return region

    async def register_shared_memory(
        self, region: SharedMemoryRegion, *, offset: int = 0, timeout: float | None = None
    ) -> None:
        """Register ``region`` (from ``offset`` to its end) under ``region.name``.

        Raises AlreadyExistsError when the server has a region of that name.
        """
        call = _base.register_shared_memory(
            region.name, region.key, region.byte_size - offset, offset
        )
        await self._invoke(call, timeout)

    async def unregister_shared_memory(
        self, region: SharedMemoryRegion | str = "", *, timeout: float | None = None
    ) -> None:
        """Unregister a region (by object or name); every region when ``""``.

        Unknown names are no error. Requests using the region finish first.
        """
        name = region.name if isinstance(region, SharedMemoryRegion) else region
        await self._invoke(_base.unregister_shared_memory(name), timeout)

    async def shared_memory_status(
        self, name: str = "", *, timeout: float | None = None
    ) -> list[RegionStatus]:
        """The registered regions (name, key, offset, byte_size); all of them for ``""``."""
        return await self._invoke(_base.shared_memory_status(name), timeout)


class AsyncStream:
    """An asyncio inference stream; see :class:`~lockgate_client.Stream`.

    ``await send(...)``, then ``async for response in stream`` (or
    ``await receive()``); ``await close()`` when done sending.
    """

    def __init__(self, call: Any, model: str, version: str) -> None:
        self._call = call
        self._model = model
        self._version = version
        self._ids = 0
        self._closed = False

    async def send(
        self,
        inputs: Mapping[str, Any],
        *,
        outputs: Sequence[str] | None = None,
        datatypes: Mapping[str, str] | None = None,
        request_id: str | None = None,
        priority: int | None = None,
        queue_timeout: float | None = None,
        parameters: Mapping[str, ParameterValue] | None = None,
    ) -> str:
        """Send one request (arguments as for ``Client.infer``); return its id."""
        if self._closed:
            raise RuntimeError("send() after close()")
        if request_id is None:
            self._ids += 1
            request_id = str(self._ids)
        request = _base.infer_request(
            self._model,
            inputs,
            outputs=outputs,
            version=self._version,
            datatypes=datatypes,
            request_id=request_id,
            priority=priority,
            queue_timeout=queue_timeout,
            parameters=parameters,
        )
        try:
            await self._call.write(request)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return request_id

    async def close(self) -> None:
        """Stop sending; responses to requests already sent still arrive."""
        if not self._closed:
            self._closed = True
            try:
                await self._call.done_writing()
            except grpc.RpcError as exc:
                raise error_from_rpc(exc) from None

    def cancel(self) -> None:
        """Abandon the stream now: pending responses are dropped."""
        self._closed = True
        self._call.cancel()

    async def receive(self) -> StreamResponse:
        """The next response; raises StopAsyncIteration when the stream has ended."""
        try:
            message = await self._call.read()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        if message is grpc.aio.EOF:  # type: ignore[attr-defined]  # (missing from grpc-stubs)
            raise StopAsyncIteration
        return _base.stream_response(message)

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> StreamResponse:
        return await self.receive()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()
