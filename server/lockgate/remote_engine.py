"""The engine process, seen from a front-end process (``--frontends N``).

``RemoteEngine`` is the ``Engine`` a front end's servicer talks to. Requests
go to the engine process as compact messages over a Unix socket (``lockgate.ipc``),
everything one loop tick produced in one frame; tensor bytes go through this
front end's two shared-memory slabs (inputs written here, outputs written by
the engine), never through the socket. Model specs, metadata, config and
readiness come from the ``Snapshot`` the engine publishes whenever its models
change, so the hot path asks nothing it cannot answer locally; a miss, the
statistics, the index and loads go to the engine.

If the engine process exits, every waiting call fails UNAVAILABLE at once
(pidfd) and the front end leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lockgate import errors
from lockgate.codec import Limits, TensorSpec
from lockgate.config import ServerConfig
from lockgate.engine import IndexRow
from lockgate.errors import LockgateError, ModelNotFoundError, ModelUnavailableError
from lockgate.ipc import messages as m
from lockgate.ipc.channel import Link, connect
from lockgate.ipc.outbox import Outbox
from lockgate.ipc.slab import RingAllocator, Slab
from lockgate.loader import tensor_specs
from lockgate.model import model_metadata
from lockgate.request import Array, InferRequest, Outputs
from lockgate.shm import SharedMemoryRegistry
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import model_config_pb2 as mc

log = logging.getLogger("lockgate.remote_engine")


@dataclass(frozen=True, eq=False)
class RemoteModel:
    """A ready model version as a front end knows it (from the engine's snapshot)."""

    engine: RemoteEngine = field(repr=False)
    name: str
    version: str
    config: mc.ModelConfig
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    output_names: frozenset[str]
    output_order: list[str]
    output_datatypes: dict[str, str]
    limits: Limits
    #: The caller named this version; False for a model's default, which the
    #: engine resolves again (a newer version may have taken over meanwhile).
    pinned: bool = True

    @classmethod
    def from_entry(cls, engine: RemoteEngine, entry: m.ModelEntry) -> RemoteModel:
        config = mc.ModelConfig.FromString(entry.config)
        outputs = tensor_specs(list(config.output))
        server = engine.config
        return cls(
            engine=engine,
            name=entry.name,
            version=entry.version,
            config=config,
            inputs=tensor_specs(list(config.input)),
            outputs=outputs,
            output_names=frozenset(outputs),
            output_order=[o.name for o in config.output],
            output_datatypes={n: s.datatype for n, s in outputs.items()},
            limits=server.request_limits(config.max_batch_size),
        )

    def metadata(self) -> pb.ModelMetadataResponse:
        return model_metadata(self.name, self.version, self.config, self.inputs, self.outputs)

    async def infer(self, request: InferRequest) -> Outputs:
        return await self.engine.infer(self, request)

    def record_failure(self, reason: str, duration_ns: int) -> None:
        self.engine.record_failure(self, reason, duration_ns)

    def release(self, outputs: Outputs) -> None:
        self.engine.release(outputs)


class EngineRegions(SharedMemoryRegistry):
    """A front end's shared-memory registry: a mirror of the engine's.

    Register and unregister go to the engine process, which maps the client's
    object and publishes its regions in the snapshot; every front end maps
    what the snapshot lists, to check and decode requests. Inputs read from a
    region travel to the engine as (region id, offset): the engine reads them
    from its own mapping, so no byte is copied between the client and the batch.
    """

    def __init__(self, engine: RemoteEngine) -> None:
        super().__init__()
        self._engine = engine

    async def add(self, name: str, key: str, offset: int, byte_size: int) -> None:
        await self._engine.call("shm_register", name, key, offset, byte_size)

    async def remove(self, name: str) -> None:
        await self._engine.call("shm_unregister", name)


#: LockgateError subclasses by name, to raise across the hop what the engine raised.
ERROR_KINDS: dict[str, type[LockgateError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, LockgateError)
}


def error_from(message: m.Error) -> LockgateError:
    return ERROR_KINDS.get(message.kind, LockgateError)(message.message)


class _Pending:
    __slots__ = ("cancelled", "future", "inputs", "request")

    def __init__(self, future: asyncio.Future[Any], inputs: list[int], request: InferRequest):
        self.future = future
        #: Regions of our inputs slab the engine may still read.
        self.inputs = inputs
        self.request = request
        self.cancelled = False


class RemoteEngine:
    """The engine process, seen from a front end."""

    def __init__(
        self,
        config: ServerConfig,
        endpoint: str,
        inputs_slab: Slab,
        outputs_slab: Slab,
        slot: int,
        on_engine_lost: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._endpoint = endpoint
        self._slab = inputs_slab
        self._allocator = RingAllocator(inputs_slab.size)
        self._outputs = outputs_slab
        self._slot = slot
        self._on_engine_lost = on_engine_lost
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._outbox: Outbox | None = None
        self._releases: list[int] = []
        #: id(outputs) → the outputs-slab regions those arrays view.
        self._held: dict[int, list[int]] = {}
        self._models: dict[tuple[str, str], RemoteModel] = {}
        #: The front end's mirror of the engine's shared-memory regions, if on.
        self.regions: SharedMemoryRegistry | None = None
        self._defaults: dict[str, RemoteModel] = {}
        self._snapshot: m.Snapshot | None = None
        self._idle: asyncio.Event | None = None
        self._channel: Link | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Set by the first snapshot whose startup loading is over.
        self.started = asyncio.Event()
        #: Called after each snapshot (the server republishes health).
        self.on_snapshot: Callable[[], Any] | None = None
        self.dead = False

    # --- connection --------------------------------------------------------------------------

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._channel = await connect(self._endpoint, self._on_frame, self._on_link_lost)
        self._outbox = Outbox(self._loop, self._channel, self._take_releases)
        self._send(m.Hello(self._slot, os.getpid(), self._slab.name, self._outputs.name))

    def watch_engine(self, pid: int) -> None:
        """Turn the engine process's exit into an event, at once (Linux pidfd)."""
        assert self._loop is not None
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux: the supervisor stops us instead
            return
        self._loop.add_reader(fd, self._engine_exited, fd)

    def _engine_exited(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_reader(fd)
        os.close(fd)
        self.lost("the engine process exited")

    def lost(self, why: str) -> None:
        """The engine is gone: every waiting call fails UNAVAILABLE now."""
        if self.dead:
            return
        self.dead = True
        log.error("%s: failing %d request(s) in flight", why, len(self._pending))
        error = ModelUnavailableError(f"{why}; retry, the server is restarting")
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._calls.clear()
        if self._outbox is not None:
            self._outbox.close()
        assert self._idle is not None
        self._idle.set()
        if self._on_engine_lost is not None:
            self._on_engine_lost()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._slab.close()
        self._outputs.close()

    async def drain(self) -> None:
        """Wait for the answers to this front end's requests, then for the engine's queues.

        Other front ends may still be finishing theirs; until they have, this
        one keeps listening, so a probe that lands here reads NOT_SERVING
        rather than a port that is closing.
        """
        assert self._idle is not None
        await self._idle.wait()
        # Once closed (the server's last drain, after it stopped listening),
        # the engine can no longer answer: nothing of ours is left to wait for.
        if not self.dead and self._channel is not None:
            with contextlib.suppress(LockgateError):
                await self._call("drained")

    # --- sending ---------------------------------------------------------------------------

    def _send(self, message: Any) -> None:
        assert self._outbox is not None
        self._outbox.put(message)

    def _take_releases(self) -> m.Release | None:
        """Outputs-slab regions the servicer is done with: one message per frame."""
        if not self._releases:
            return None
        releases, self._releases = self._releases, []
        return m.Release(releases)

    async def call(self, op: str, *args: Any) -> Any:
        """A control operation in the engine process."""
        return await self._call(op, *args)

    async def _call(self, op: str, *args: Any) -> Any:
        if self.dead:
            raise ModelUnavailableError("the engine process is not running")
        assert self._loop is not None
        call_id = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = future
        self._send(m.Call(call_id, op, list(args)))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    # --- receiving -------------------------------------------------------------------------

    def _on_link_lost(self, link: Link) -> None:
        if self._channel is link and not link.closed_here:
            self.lost("the connection to the engine process closed")

    def _on_frame(self, link: Link, frame: bytes) -> None:
        try:
            for message in m.decode_to_frontend(frame):
                self._dispatch(message)
        except Exception:  # a bug of ours: say so, keep reading
            log.exception("cannot handle a message from the engine")

    def _dispatch(self, message: m.ToFrontend) -> None:
        if isinstance(message, m.Result):
            self._on_result(message)
        elif isinstance(message, m.Error):
            self._on_error(message)
        elif isinstance(message, m.Reply):
            future = self._calls.get(message.id)
            if future is not None and not future.done():
                future.set_result(message.value)
        elif isinstance(message, m.Snapshot):
            self._on_snapshot(message)

    def _finish(self, request_id: int) -> _Pending | None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return None
        for offset in pending.inputs:
            self._allocator.free(offset)
        if not self._pending:
            assert self._idle is not None
            self._idle.set()
        return pending

    def _on_result(self, message: m.Result) -> None:
        pending = self._finish(message.id)
        regions = [t.offset for t in message.outputs if t.offset >= 0 and not t.region]
        if pending is None or pending.future.done():
            self._releases.extend(regions)
            return
        request = pending.request
        request.dequeue_ns = message.dequeue_ns
        request.compute_ns = message.compute_ns
        request.served_version = message.version
        outputs = {
            t.name: _placed_array(t, request) if t.region else self._array(t)
            for t in message.outputs
        }
        if regions:
            # Views of our outputs slab: held until the servicer has encoded them.
            self._held[id(outputs)] = regions
        pending.future.set_result(outputs)

    def release(self, outputs: Outputs) -> None:
        regions = self._held.pop(id(outputs), None)
        if regions is None or self.dead:
            return
        self._releases.extend(regions)
        assert self._outbox is not None
        self._outbox.wake()

    def _on_error(self, message: m.Error) -> None:
        call = self._calls.get(message.id)
        if call is not None:
            if not call.done():
                call.set_exception(error_from(message))
            return
        pending = self._finish(message.id)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(error_from(message))

    def _array(self, tensor: m.TensorRef) -> Array:
        if tensor.dtype == "BYTES":
            assert isinstance(tensor.data, list)
            values = np.empty(len(tensor.data), dtype=np.object_)
            values[:] = tensor.data
            return values.reshape(tensor.shape)
        dtype = _dtype(tensor.dtype)
        if tensor.offset >= 0:
            buffer: Any = self._outputs.buffer[tensor.offset : tensor.offset + tensor.nbytes]
        else:
            buffer = tensor.data
        return np.frombuffer(buffer, dtype=dtype).reshape(tensor.shape)

    def _on_snapshot(self, snapshot: m.Snapshot) -> None:
        models = {(e.name, e.version): RemoteModel.from_entry(self, e) for e in snapshot.models}
        self._models = models
        self._defaults = {
            name: dataclasses.replace(models[(name, version)], pinned=False)
            for name, version in snapshot.defaults.items()
            if (name, version) in models
        }
        self._snapshot = snapshot
        if self.regions is not None:
            self.regions.mirror(
                [(r.id, r.name, r.key, r.offset, r.byte_size) for r in snapshot.regions]
            )
        if snapshot.started:
            self.started.set()
        if self.on_snapshot is not None:
            self.on_snapshot()

    # --- Engine ------------------------------------------------------------------------------

    def model(self, name: str, version: str = "") -> RemoteModel | None:
        if version:
            return self._models.get((name, version))
        return self._defaults.get(name)

    async def lookup(self, name: str, version: str = "") -> RemoteModel:
        model = self.model(name, version)
        if model is not None:
            return model
        entry = await self._call("lookup", name, version)
        return RemoteModel.from_entry(self, m.ModelEntry(*entry))

    async def model_ready(self, name: str, version: str = "") -> bool:
        try:
            await self.lookup(name, version)
        except (ModelNotFoundError, ModelUnavailableError):
            return False
        return True

    async def metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        model = await self.lookup(name, version)
        response = model.metadata()
        if not version:
            del response.versions[:]
            response.versions.extend(self.ready_versions(model.name))
        return response

    async def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        return (await self.lookup(name, version)).config

    async def statistics(self, name: str = "", version: str = "") -> list[pb.ModelStatistics]:
        data = await self._call("statistics", name, version)
        return list(pb.ModelStatisticsResponse.FromString(data).model_stats)

    async def index(self, ready_only: bool = False) -> list[IndexRow]:
        rows = await self._call("index", ready_only)
        return [(name, version, state, reason) for name, version, state, reason in rows]

    async def load(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        await self._call("load", name, config_json, files)

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        await self._call("unload", name, unload_dependents)

    # --- what the server's health needs ------------------------------------------------------

    def ready_versions(self, name: str) -> list[str]:
        return [version for (model, version) in self._models if model == name]

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        """Whether every model is ready, and which models are (from the snapshot)."""
        snapshot = self._snapshot
        if snapshot is None:
            return False, {}
        ready = {name for name, _ in self._models}
        return snapshot.all_ready, {name: name in ready for name in snapshot.names}

    # --- a model's requests ------------------------------------------------------------------

    async def infer(self, model: RemoteModel, request: InferRequest) -> Outputs:
        if self.dead:
            raise ModelUnavailableError("the engine process is not running; retry")
        assert self._loop is not None
        request_id = next(self._ids)
        tensors, regions = self._put_inputs(request.inputs, request.shared_inputs)
        trace = request.trace
        message = m.Infer(
            id=request_id,
            model=model.name,
            version=model.version if model.pinned else "",
            inputs=tensors,
            rows=request.rows,
            shape_key=list(request.shape_key),
            outputs=request.outputs,
            request_id=request.request_id,
            priority=request.priority,
            timeout_us=request.timeout_us,
            deadline=request.deadline,
            arrival_ns=request.arrival_ns,
            trace=trace.parent_ids() if trace is not None else None,
            correlation_id=request.correlation_id,
            sequence_start=request.sequence_start,
            sequence_end=request.sequence_end,
            placed=_placed(model, request) if request.output_placements else None,
        )
        future: asyncio.Future[Outputs] = self._loop.create_future()
        pending = _Pending(future, regions, request)
        self._pending[request_id] = pending
        assert self._idle is not None
        self._idle.clear()
        self._send(message)
        try:
            return await future
        except asyncio.CancelledError:
            if request_id in self._pending and not pending.cancelled:
                pending.cancelled = True
                self._send(m.Cancel(request_id))
            elif future.done() and not future.cancelled() and future.exception() is None:
                # Answered, then cancelled before the caller could encode it.
                self.release(future.result())
            raise

    def _put_inputs(
        self, inputs: dict[str, Array], shared: dict[str, tuple[int, int]] | None
    ) -> tuple[list[m.TensorRef], list[int]]:
        tensors = []
        regions = []
        for name, array in inputs.items():
            if shared is not None and name in shared:
                # In a client region the engine maps too: a reference, no copy.
                ident, start = shared[name]
                tensors.append(
                    m.TensorRef(
                        name, array.dtype.str, array.shape, start, array.nbytes, region=ident
                    )
                )
                continue
            if array.dtype == np.object_:
                tensors.append(m.TensorRef(name, "BYTES", array.shape, data=array.ravel().tolist()))
                continue
            datatype = array.dtype.str
            nbytes = array.nbytes
            offset = self._allocator.alloc(nbytes)
            if offset is None:  # the slab is full: inline costs a copy, not the request
                tensors.append(m.TensorRef(name, datatype, array.shape, data=array.tobytes()))
                continue
            self._slab.write(offset, array)
            regions.append(offset)
            tensors.append(m.TensorRef(name, datatype, array.shape, offset, nbytes))
        return tensors, regions

    def record_failure(self, model: RemoteModel, reason: str, duration_ns: int) -> None:
        if not self.dead and self._loop is not None:
            failed = m.Failed(model.name, model.version, reason, duration_ns)
            self._loop.call_soon_threadsafe(self._send, failed)


def _placed(model: RemoteModel, request: InferRequest) -> dict[str, tuple[int, int, int]]:
    """Requested outputs the engine writes into client regions itself: one copy, not two.

    BYTES outputs are not among them: the response's encoder needs their
    values, and only a front end serializes them.
    """
    assert request.output_placements is not None and request.lease is not None
    placed = {}
    for name, placement in request.output_placements.items():
        region = request.lease.get(placement.region)
        if region is not None and model.output_datatypes[name] != "BYTES":
            placed[name] = (region.id, placement.offset, placement.byte_size)
    return placed


def _placed_array(tensor: m.TensorRef, request: InferRequest) -> Array:
    """An output the engine wrote into a client region, viewed through our mapping of it."""
    assert request.lease is not None
    region = next(r for r in request.lease if r.id == tensor.region)
    data = region.view(tensor.offset, tensor.nbytes, f"output '{tensor.name}'")
    return data.view(_dtype(tensor.dtype)).reshape(tensor.shape)


_DTYPES: dict[str, np.dtype[Any]] = {}


def _dtype(name: str) -> np.dtype[Any]:
    """numpy dtype from its string, parsed once per kind."""
    dtype = _DTYPES.get(name)
    if dtype is None:
        dtype = _DTYPES[name] = np.dtype(name)
    return dtype
