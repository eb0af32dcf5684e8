"""The engine process (``--frontends N``): models, schedulers and sessions for every front end.

One busy loop: it reads frames of messages from the front ends (a Unix
socket each, ipc/channel.py), turns each ``Infer`` into an ``InferRequest``
whose arrays are numpy views of the sender's inputs slab, and submits it to
the same ``ModelVersion.infer`` a single-process server uses, so one
scheduler per model batches requests from every front end together. Outputs
go into the sender's outputs slab; what one loop tick produced for a front
end leaves in one frame (ipc/outbox.py). The engine also serves /metrics
and polls the repository, and publishes a ``Snapshot`` of its models
whenever they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from typing import Any

import numpy as np

from lockgate import tracing
from lockgate.codec import to_shared_memory
from lockgate.config import ServerConfig
from lockgate.engine import LocalEngine
from lockgate.errors import LockgateError, UnsupportedError
from lockgate.ipc import messages as m
from lockgate.ipc.channel import Link
from lockgate.ipc.outbox import Outbox
from lockgate.ipc.slab import RingAllocator, Slab
from lockgate.lifecycle import Lifecycle
from lockgate.model import ModelVersion
from lockgate.repository import ModelRepository
from lockgate.request import Array, InferRequest, Outputs
from lockgate.shm import Lease, Placement, SharedMemoryRegistry
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client.datatypes import WIRE_DTYPES

log = logging.getLogger("lockgate.engine")

#: After the drain, how long a batch already running may take to finish.
RUNNING_BATCH_GRACE_S = 5.0


class Peer:
    """One connected front end: its slabs, its requests in flight, its outbox."""

    def __init__(self, identity: Link, hello: m.Hello, loop: asyncio.AbstractEventLoop) -> None:
        self.identity = identity
        self.slot = hello.slot
        self.pid = hello.pid
        self.inputs = Slab(hello.inputs_slab, 0, create=False)
        self.outputs = Slab(hello.outputs_slab, 0, create=False)
        #: The engine is the only writer of the outputs slab.
        self.allocator = RingAllocator(self.outputs.size)
        self.running: dict[int, tuple[asyncio.Future[Outputs], InferRequest]] = {}
        self.outbox = Outbox(loop, identity)
        self.gone = False

    def close(self) -> None:
        self.outbox.close()
        self.inputs.close()
        self.outputs.close()


class EngineProcess:
    """Owns the repository and answers every front end."""

    def __init__(self, config: ServerConfig, endpoint: str) -> None:
        self.config = config
        self.endpoint = endpoint
        self.lifecycle = Lifecycle()
        self.tracer = tracing.setup(config)
        observer = self.tracer.observe_batch if self.tracer is not None else None
        self.repository = ModelRepository(config, self.lifecycle, observer)
        self.engine = LocalEngine(self.repository)
        #: The one registry of client regions; front ends mirror it from snapshots.
        self.shared_memory = SharedMemoryRegistry() if config.shared_memory == "system" else None
        self._peers: dict[Link, Peer] = {}
        self._started = False
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._configs: dict[int, bytes] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._metrics_server: Any = None
        self._poller: Any = None

    async def run(self) -> None:
        """Serve until the supervisor's SIGTERM; then drain and stop."""
        loop = self._loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_signal)
        loop.add_signal_handler(signal.SIGUSR1, self._on_drain)
        from lockgate.supervisor import EARLY_SIGTERM

        if EARLY_SIGTERM.is_set():
            self._on_signal()
        # A missing path, or two models under one name: the server does not start.
        self.repository.check_locations()
        self.repository.check_names()
        listener = await loop.create_unix_server(
            lambda: Link(self._on_frame, self._on_link_lost), self.endpoint
        )
        from lockgate.server import serve_metrics

        self._metrics_server = serve_metrics(self.config, self.repository)
        await self._load_models()
        self._started = True
        self.publish()
        draining = self._stopping.is_set() or self.lifecycle.loads_abandoned.is_set()
        if self.config.model_control_mode == "poll" and not draining:
            from lockgate.poller import RepositoryPoller

            self._poller = RepositoryPoller(
                self.repository, self.config.repository_poll_secs, self._models_changed
            )
            self._poller.start()
        await self._stopping.wait()
        await self._drain()
        listener.close()

    def _on_drain(self) -> None:
        """The front ends began draining (SIGUSR1 from the supervisor).

        Requests they accepted still come; but the repository must no longer
        change under the drain, and loads under way give up.
        """
        self.lifecycle.loads_abandoned.set()
        if self._poller is not None:
            self._poller.stop()

    def _on_signal(self) -> None:
        if self._stopping.is_set():
            log.warning("second SIGTERM: exiting now")
            os._exit(1)
        self.lifecycle.loads_abandoned.set()
        self._stopping.set()

    async def _load_models(self) -> None:
        started = time.monotonic()
        mode = self.config.model_control_mode
        names = None if mode != "explicit" else self.config.load_models
        if names == ["*"]:
            names = None
        try:
            await self.repository.load_all(names)
        except LockgateError as exc:
            if not self._stopping.is_set():
                log.warning("not every model loaded: %s", exc.message)
        log.info(
            "%d model version(s) ready in %.2f s",
            len(self.repository.ready_models()),
            time.monotonic() - started,
        )

    async def _drain(self) -> None:
        """The front ends have drained: finish what is left, close the models."""
        if self._poller is not None:
            self._poller.stop()
        try:
            await asyncio.wait_for(self.repository.drain(), self.config.drain_seconds)
        except TimeoutError:
            self.lifecycle.drain_expired = True
            log.warning("drain time is up: cancelling the requests still queued")
        self.repository.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.repository.drain(), RUNNING_BATCH_GRACE_S)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.tracer is not None:
            self.tracer.shutdown()
        for peer in list(self._peers.values()):
            peer.close()
        if self.shared_memory is not None:
            self.shared_memory.close()
        log.info("engine stopped")

    async def _models_changed(self) -> None:
        """The poller's hook after a change: tell every front end."""
        self.publish()

    # --- snapshot -------------------------------------------------------------------------

    def snapshot(self) -> m.Snapshot:
        repository = self.repository
        models = repository.ready_models()
        configs = {id(model): self._config_bytes(model) for model in models}
        self._configs = configs  # forget unloaded versions
        defaults = {}
        for name in repository.names():
            with contextlib.suppress(LockgateError):
                defaults[name] = repository.get(name).version
        return m.Snapshot(
            started=self._started,
            names=repository.names(),
            models=[m.ModelEntry(x.name, x.version, configs[id(x)]) for x in models],
            defaults=defaults,
            all_ready=repository.all_ready(),
            regions=[
                m.RegionEntry(r.id, r.name, r.key, r.offset, r.byte_size)
                for r in (self.shared_memory.status("") if self.shared_memory is not None else [])
            ],
        )

    def _config_bytes(self, model: ModelVersion) -> bytes:
        data = self._configs.get(id(model))
        return data if data is not None else model.config.SerializeToString()

    def publish(self, only: Peer | None = None) -> None:
        snapshot = self.snapshot()
        for peer in [only] if only is not None else list(self._peers.values()):
            self._send(peer, snapshot)

    # --- messages in --------------------------------------------------------------------------

    def _on_link_lost(self, link: Link) -> None:
        peer = self._peers.get(link)
        if peer is not None:
            self._gone(peer)

    def _on_frame(self, key: Link, frame: bytes) -> None:
        try:
            messages = m.decode_to_engine(frame)
        except Exception:
            log.exception("cannot decode a frame from a front end")
            return
        for message in messages:
            try:
                self._dispatch(key, message)
            except Exception:  # a bug of ours: say so, keep serving
                log.exception("cannot handle %s", type(message).__name__)

    def _dispatch(self, key: Link, message: m.ToEngine) -> None:
        if isinstance(message, m.Hello):
            self._hello(key, message)
            return
        peer = self._peers.get(key)
        if peer is None:
            return  # a front end that has gone
        if isinstance(message, m.Infer):
            self._infer(peer, message)
        elif isinstance(message, m.Release):
            for offset in message.offsets:
                peer.allocator.free(offset)
        elif isinstance(message, m.Cancel):
            running = peer.running.get(message.id)
            # Not yet taken into a batch: drop it. Once running, ONNX Runtime
            # may still read its inputs, so the answer (and the release of
            # those inputs) waits for the batch.
            if running is not None and not running[1].dequeue_ns:
                running[0].cancel()
        elif isinstance(message, m.Failed):
            with contextlib.suppress(LockgateError):
                model = self.repository.get(message.model, message.version)
                model.stats.record_failure(message.reason, message.duration_ns)
        elif isinstance(message, m.Call):
            self._spawn(self._call(peer, message))

    def _hello(self, key: Link, hello: m.Hello) -> None:
        try:
            assert self._loop is not None
            peer = Peer(key, hello, self._loop)
        except OSError as exc:
            log.error("front end %d: cannot map its shared memory: %s", hello.slot, exc)
            return
        self._peers[key] = peer
        log.info("front end %d (pid %d) connected", peer.slot, peer.pid)
        self._watch(peer)
        self.publish(only=peer)

    def _watch(self, peer: Peer) -> None:
        """A front end's exit is an event: its requests are dropped, its slabs unmapped."""
        assert self._loop is not None
        try:
            fd = os.pidfd_open(peer.pid)
        except OSError:
            self._gone(peer)  # already gone
            return
        loop = self._loop

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            self._gone(peer)

        loop.add_reader(fd, exited)

    def _gone(self, peer: Peer) -> None:
        if peer.gone:
            return  # both its connection and its pid said so
        peer.gone = True
        self._peers.pop(peer.identity, None)
        for future, request in list(peer.running.values()):
            if not request.dequeue_ns:
                future.cancel()
        log.info("front end %d (pid %d) gone", peer.slot, peer.pid)
        peer.close()

    # --- inference ------------------------------------------------------------------------

    def _infer(self, peer: Peer, message: m.Infer) -> None:
        lease: Lease | None = None
        placements = None
        try:
            model = self.repository.get(message.model, message.version)
            inputs = {}
            for tensor in message.inputs:
                if tensor.region:
                    lease = lease or Lease()
                    inputs[tensor.name] = self._region_view(lease, tensor)
                else:
                    inputs[tensor.name] = _view(peer.inputs, tensor)
            if message.placed:
                lease = lease or Lease()
                placements = self._output_placements(lease, message.placed)
        except LockgateError as exc:
            if lease is not None:
                lease.release()
            self._send(peer, m.Error(message.id, type(exc).__name__, exc.message))
            return
        request = InferRequest(
            inputs=inputs,
            rows=message.rows,
            outputs=message.outputs,
            shape_key=tuple(message.shape_key),
            request_id=message.request_id,
            priority=message.priority,
            timeout_us=message.timeout_us,
            deadline=message.deadline,
            arrival_ns=message.arrival_ns,
            lease=lease,
            output_placements=placements,
            correlation_id=message.correlation_id,
            sequence_start=message.sequence_start,
            sequence_end=message.sequence_end,
        )
        if message.trace is not None and self.tracer is not None:
            request.trace = self.tracer.remote_parent(message.trace)
        try:
            future = model.submit(request)
        except LockgateError as exc:  # a full queue, an unloading model
            if lease is not None:
                _release(request)
            self._send(peer, m.Error(message.id, type(exc).__name__, exc.message))
            return
        future.add_done_callback(functools.partial(self._answer, peer, message.id, model, request))
        peer.running[message.id] = (future, request)

    def _region_view(self, lease: Lease, tensor: m.TensorRef) -> Array:
        """An input in a client's region, viewed through our own mapping of it."""
        what = f"input '{tensor.name}'"
        if self.shared_memory is None:
            raise UnsupportedError(f"{what}: system shared memory is off on this server")
        region = self.shared_memory.lease_id(lease, tensor.region, what)
        data = region.view(tensor.offset, tensor.nbytes, what)
        return data.view(_dtype(tensor.dtype)).reshape(tensor.shape)

    def _output_placements(
        self, lease: Lease, placed: dict[str, tuple[int, int, int]]
    ) -> dict[str, Placement]:
        """Where in client regions to write outputs; each range checked now."""
        regions = self._regions()
        placements = {}
        for name, (ident, offset, byte_size) in placed.items():
            what = f"output '{name}'"
            region = regions.lease_id(lease, ident, what)
            region.check_range(offset, byte_size, what)
            placements[name] = Placement(region.name, offset, byte_size)
        return placements

    def _answer(
        self,
        peer: Peer,
        request_id: int,
        model: ModelVersion,
        request: InferRequest,
        future: asyncio.Future[Outputs],
    ) -> None:
        """The request's future is done: send its result or error, return its regions."""
        peer.running.pop(request_id, None)
        try:
            if future.cancelled():
                raise asyncio.CancelledError
            outputs = future.result()
            # First: a region too small for its output fails the request here.
            placed = _write_placed(model, request, outputs) if request.output_placements else {}
        except LockgateError as exc:
            reply: Any = m.Error(request_id, type(exc).__name__, exc.message)
        except asyncio.CancelledError:
            reply = m.Error(request_id, "RequestCancelledError", "the caller cancelled")
        except Exception as exc:
            log.exception("internal error running a request for %s", model.name)
            reply = m.Error(request_id, "LockgateError", f"internal error: {exc}")
        else:
            reply = m.Result(
                request_id,
                model.version,
                [placed.get(name) or _put(peer, name, array) for name, array in outputs.items()],
                request.dequeue_ns,
                request.compute_ns,
            )
        finally:
            if request.lease is not None:
                _release(request)
        self._send(peer, reply)

    # --- control --------------------------------------------------------------------------

    async def _call(self, peer: Peer, call: m.Call) -> None:
        try:
            value = await self._control(call.op, call.args)
        except LockgateError as exc:
            self._send(peer, m.Error(call.id, type(exc).__name__, exc.message))
        except Exception as exc:
            log.exception("internal error in %s", call.op)
            self._send(peer, m.Error(call.id, "LockgateError", f"internal error: {exc}"))
        else:
            self._send(peer, m.Reply(call.id, value))

    async def _control(self, op: str, args: list[Any]) -> Any:
        engine = self.engine
        if op == "drained":  # a draining front end: answered once every queue is idle
            await self.repository.drain()
            return None
        if op == "lookup":
            model = self.repository.get(args[0], args[1])
            return [model.name, model.version, self._config_bytes(model)]
        if op == "statistics":
            stats = await engine.statistics(args[0], args[1])
            return pb.ModelStatisticsResponse(model_stats=stats).SerializeToString()
        if op == "index":
            return await engine.index(bool(args[0]))
        if op == "load":
            try:
                await engine.load(args[0], args[1], args[2])
            finally:
                self.publish()  # before the reply: its caller then sees the change
            return None
        if op == "shm_register":
            try:
                self._regions().register(args[0], args[1], args[2], args[3])
            finally:
                self.publish()  # before the reply: every front end maps it
            return None
        if op == "shm_unregister":
            try:
                self._regions().unregister(args[0])
            finally:
                self.publish()
            return None
        if op == "unload":
            try:
                await engine.unload(args[0], bool(args[1]) if len(args) > 1 else False)
            finally:
                self.publish()
            return None
        raise LockgateError(f"unknown engine operation {op!r}")

    def _regions(self) -> SharedMemoryRegistry:
        if self.shared_memory is None:
            raise UnsupportedError("system shared memory is off on this server")
        return self.shared_memory

    def _spawn(self, coroutine: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- messages out ---------------------------------------------------------------------

    def _send(self, peer: Peer, message: Any) -> None:
        peer.outbox.put(message)  # closed, and so silent, once the front end is gone


_DTYPES: dict[str, np.dtype[Any]] = {}


def _dtype(name: str) -> np.dtype[Any]:
    dtype = _DTYPES.get(name)
    if dtype is None:
        dtype = _DTYPES[name] = np.dtype(name)
    return dtype


def _release(request: InferRequest) -> None:
    """Return the request's lease on client regions (views first: the last lease unmaps)."""
    assert request.lease is not None
    request.inputs = {}
    request.lease.release()


def _view(slab: Slab, tensor: m.TensorRef) -> Array:
    """The tensor as numpy: a view of the slab, or of the inline bytes."""
    if tensor.dtype == "BYTES":
        assert isinstance(tensor.data, list)
        values = np.empty(len(tensor.data), dtype=np.object_)
        values[:] = tensor.data
        return values.reshape(tensor.shape)
    if tensor.offset >= 0:
        buffer: Any = slab.buffer[tensor.offset : tensor.offset + tensor.nbytes]
    else:
        buffer = tensor.data
    return np.frombuffer(buffer, dtype=_dtype(tensor.dtype)).reshape(tensor.shape)


def _write_placed(
    model: ModelVersion, request: InferRequest, outputs: dict[str, Array]
) -> dict[str, m.TensorRef]:
    """Write the outputs placed in client regions there (the one copy); their references."""
    assert request.output_placements is not None and request.lease is not None
    refs = {}
    for name, placement in request.output_placements.items():
        region = request.lease.get(placement.region)
        assert region is not None  # leased with the request
        datatype = model.output_datatypes[name]
        array = outputs[name]
        nbytes = to_shared_memory(array, datatype, name, region, placement)
        dtype = WIRE_DTYPES[datatype].str
        refs[name] = m.TensorRef(
            name, dtype, array.shape, placement.offset, nbytes, region=region.id
        )
    return refs


def _put(peer: Peer, name: str, array: Array) -> m.TensorRef:
    """An output into the front end's outputs slab (inline if the slab is full)."""
    if array.dtype == np.object_:
        return m.TensorRef(name, "BYTES", array.shape, data=array.ravel().tolist())
    array = np.ascontiguousarray(array)
    offset = peer.allocator.alloc(array.nbytes)
    if offset is None:
        return m.TensorRef(name, array.dtype.str, array.shape, data=array.tobytes())
    peer.outputs.write(offset, array)
    return m.TensorRef(name, array.dtype.str, array.shape, offset, array.nbytes)


def engine_main(config: ServerConfig, endpoint: str, supervisor_pid: int) -> None:
    """The engine process's entry point (spawned by the supervisor)."""
    from lockgate.supervisor import become_child, run_loop

    become_child("engine", config, supervisor_pid)
    run_loop(EngineProcess(config, endpoint).run())
