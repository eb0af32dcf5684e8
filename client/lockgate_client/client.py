"""The blocking client: ``Client`` and its inference ``Stream``."""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

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

__all__ = ["Client", "Stream"]

T = TypeVar("T")


class Client(BaseClient):
    """A blocking client for Lockgate or any KServe v2 / Triton gRPC server.

    Thread-safe: share one instance; it holds one channel (an HTTP/2
    connection of its own to every endpoint), or ``connections`` of them.
    Use it as a context manager, or call :meth:`close`.

    Args:
        url: ``"host:port"``; a gRPC name such as ``"dns:///svc:8001"`` (calls
            are spread round-robin over every address it resolves to); or a
            list of ``"ip:port"`` endpoints to spread calls over.
        timeout: default deadline of each call, in seconds (None: no deadline).
            Retries happen within it.
        retries: a :class:`RetryPolicy`; or an int ``n`` to retry every call,
            ``infer`` included, up to ``n`` times on ``UNAVAILABLE``. By default
            idempotent calls (health, metadata, config, statistics, index) are
            retried 3 times and ``infer`` is not.
        tls: False for plaintext; True for TLS with the system's roots; or
            the PEM root certificate(s) to trust, as bytes or a file path.
        client_cert: PEM client certificate chain for mTLS (bytes or path).
        client_key: PEM private key of ``client_cert`` (bytes or path).
        server_name: the name to check the server certificate against, when it
            differs from the host in ``url``.
        token: sent as ``authorization: Bearer <token>`` on every call.
        compression: ``"gzip"`` or ``"deflate"`` to compress requests.
        keepalive: seconds between HTTP/2 pings while calls are open (None: off).
        metadata: extra gRPC metadata (headers) sent on every call.
        connections: channels to open, each with its own connection to every
            endpoint; calls take them in turn (a stream stays on one). A
            server with several front-end processes (``--frontends N``) gets
            each connection to one of them, so a busy client spreads its
            calls over the server's front ends with more than one.
    """

    def _open(self) -> None:
        self._channels = [self._settings.sync_channel() for _ in range(self._settings.connections)]
        self._stubs = [
            service.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            for channel in self._channels
        ]
        self._turns = itertools.count()

    @property
    def _stub(self) -> Any:
        """The stub of the channel whose turn it is."""
        stubs = self._stubs
        return stubs[0] if len(stubs) == 1 else stubs[next(self._turns) % len(stubs)]

    def close(self) -> None:
        """Close the channels; calls in flight are cancelled."""
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _invoke(self, call: Call[T], timeout: float | None, retries: int | None = None) -> T:
        schedule = self._schedule(call, timeout, retries)
        method = getattr(self._stub, call.method)
        while True:
            try:
                reply = method(
                    call.request, timeout=schedule.remaining(), metadata=self._call_metadata()
                )
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                delay = schedule.next_delay(error)
                if delay is None:
                    raise error from None
                time.sleep(delay)
            else:
                return call.parse(reply)

    # Inference

    def infer(
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
        """Run one inference and return its outputs as ``{name: numpy array}``.

        Args:
            model: the model's name.
            inputs: input name -> array (or anything ``numpy.asarray`` takes).
                The datatype follows the dtype: ``str``/``bytes``/``object``
                arrays are ``BYTES``, ``ml_dtypes.bfloat16`` is ``BF16``.
            outputs: names of the outputs to return (default: all).
            version: the model version ("" lets the server choose).
            datatypes: input name -> KServe datatype overriding the dtype's,
                e.g. ``{"X": "BF16"}`` or ``{"X": "INT32"}`` for a list of ints.
            request_id: the request's ``id``, echoed by the server.
            priority: scheduling priority (1 is the highest; 0 the model's default).
            queue_timeout: seconds the request may wait in the server's queue
                (the protocol's ``timeout`` parameter).
            parameters: extra request parameters.
            timeout: this call's deadline in seconds (default: the client's).
            retries: retries on ``UNAVAILABLE`` for this call (default: the
                client's policy, which retries ``infer`` only when enabled).

        Returns:
            ``BYTES`` outputs are ``object`` arrays of ``bytes``; ``BF16`` ones
            are ``float32``; others are read-only views of the reply's bytes.

        Raises:
            LockgateError: the subclass matching the failure's status code.
            TypeError: an input cannot be sent as the requested datatype.
        """
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
        return self._invoke(_base.infer_call(request, outputs), timeout, retries)

    def stream(self, model: str, *, version: Version = "", timeout: float | None = None) -> Stream:
        """Open a bidirectional inference stream to ``model``.

        ``timeout`` bounds the whole stream's life (default: none; the client's
        default deadline does not apply to streams).
        """
        return Stream(
            self._stub,
            _base.model_name(model),
            _base.version_text(version),
            timeout,
            self._call_metadata(),
        )

    # Health

    def is_live(self, *, timeout: float | None = None) -> bool:
        """Whether the server is live (its process is up and answering).

        False, not an error, when the server cannot be reached (refused, no
        route, a failed TLS handshake) or does not answer within ``timeout``;
        asked once, without retries. A call the server answers with an error
        (a rejected token...) still raises.
        """
        return _base.answered(lambda: self._invoke(_base.server_live(), timeout, retries=0))

    def is_ready(
        self, model: str | None = None, version: Version = "", *, timeout: float | None = None
    ) -> bool:
        """Whether the server (or, given ``model``, that model) is ready for inference.

        False when the server cannot be reached, as for :meth:`is_live`.
        """
        return _base.answered(lambda: self._ready(model, version, timeout))

    def _ready(self, model: str | None, version: Version, timeout: float | None) -> bool:
        call = _base.server_ready() if model is None else _base.model_ready(model, version)
        return self._invoke(call, timeout, retries=0)

    def wait_ready(self, model: str | None = None, *, timeout: float = 30.0) -> None:
        """Block until :meth:`is_ready` is true; raise DeadlineExceededError after ``timeout``.

        Connection failures while waiting count as "not ready yet".
        """
        deadline = time.monotonic() + timeout
        last: LockgateError | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = f": last error {last}" if last else ""
                raise DeadlineExceededError(f"not ready after {timeout} s{detail}")
            try:
                if self._ready(model, "", min(remaining, 5.0)):
                    return
            except LockgateError as exc:
                last = exc
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    # Metadata and statistics

    def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        """The server's name, version and protocol extensions."""
        return self._invoke(_base.server_metadata(), timeout)

    def metadata(
        self, model: str, version: Version = "", *, timeout: float | None = None
    ) -> ModelMetadata:
        """A model's versions, platform, and input/output names, datatypes and shapes."""
        return self._invoke(_base.model_metadata(model, version), timeout)

    def config(
        self, model: str, version: Version = "", *, timeout: float | None = None
    ) -> ModelConfig:
        """A model's configuration (Triton's ``ModelConfig`` message)."""
        return self._invoke(_base.model_config(model, version), timeout)

    def statistics(
        self, model: str = "", version: Version = "", *, timeout: float | None = None
    ) -> list[ModelStatistics]:
        """Inference statistics, one entry per model version ("" model: every model)."""
        return self._invoke(_base.model_statistics(model, version), timeout)

    # Repository

    def models(self, *, ready: bool = False, timeout: float | None = None) -> list[ModelIndex]:
        """The model repository's index: each model version with its state and reason."""
        return self._invoke(_base.repository_index(ready), timeout)

    def load(
        self,
        model: str,
        *,
        config: str | Mapping[str, Any] | ModelConfig | None = None,
        files: Mapping[str, bytes] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Load or reload ``model`` (the server must allow explicit model control).

        ``config`` (JSON text, a dict, or a ModelConfig) overrides the stored
        configuration; ``files`` maps paths in the model directory (such as
        ``"1/model.onnx"``) to their content.
        """
        self._invoke(_base.load_model(model, config, files), timeout)

    def unload(
        self, model: str, *, unload_dependents: bool = False, timeout: float | None = None
    ) -> None:
        """Unload ``model``; requests in flight finish first."""
        self._invoke(_base.unload_model(model, unload_dependents), timeout)

    # System shared memory

    def create_shared_memory(
        self, name: str, byte_size: int, *, timeout: float | None = None
    ) -> SharedMemoryRegion:
        """Create a shared-memory region of ``byte_size`` bytes and register it as ``name``.

        The server must run on this host. Place inputs with ``region.write(array)``
        and room for outputs with ``region.output(nbytes)``, then pass them to
        :meth:`infer`; outputs in the region come back as views of it.
        ``region.close()`` (or ``with``) unregisters it, unmaps and removes it.
        """
        region = SharedMemoryRegion(name, byte_size)
        try:
            self.register_shared_memory(region, timeout=timeout)
        except BaseException:
            region.close()
            raise
        region._on_close = lambda r: self.unregister_shared_memory(r.name)
        return region

    def register_shared_memory(
        self, region: SharedMemoryRegion, *, offset: int = 0, timeout: float | None = None
    ) -> None:
        """Register ``region`` (from ``offset`` to its end) under ``region.name``.

        Raises AlreadyExistsError when the server has a region of that name.
        """
        call = _base.register_shared_memory(
            region.name, region.key, region.byte_size - offset, offset
        )
        self._invoke(call, timeout)

    def unregister_shared_memory(
        self, region: SharedMemoryRegion | str = "", *, timeout: float | None = None
    ) -> None:
        """Unregister a region (by object or name); every region when ``""``.

        Unknown names are no error. Requests using the region finish first.
        """
        name = region.name if isinstance(region, SharedMemoryRegion) else region
        self._invoke(_base.unregister_shared_memory(name), timeout)

    def shared_memory_status(
        self, name: str = "", *, timeout: float | None = None
    ) -> list[RegionStatus]:
        """The registered regions (name, key, offset, byte_size); all of them for ``""``."""
        return self._invoke(_base.shared_memory_status(name), timeout)


class Stream:
    """A bidirectional inference stream (``ModelStreamInfer``) to one model.

    :meth:`send` queues a request and returns its id; iterating yields a
    :class:`StreamResponse` per request, in the order the server answers. A
    failed request yields a response whose ``error`` is set; the stream stays
    open. Iteration ends once :meth:`close` was called and every answer has
    arrived; it raises a ``LockgateError`` if the stream itself fails.
    """

    def __init__(
        self,
        stub: Any,
        model: str,
        version: str,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        self._model = model
        self._version = version
        self._ids = 0
        # gRPC pulls requests from this iterator on its own thread; None ends it.
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._call = stub.ModelStreamInfer(
            iter(self._requests.get, None), timeout=timeout, metadata=metadata
        )

    def send(
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
        """Queue one request (arguments as for ``Client.infer``); return its id.

        Without ``request_id`` the stream numbers requests "1", "2", ...
        """
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
        self._requests.put(request)
        return request_id

    def close(self) -> None:
        """Stop sending; responses to requests already sent still arrive."""
        if not self._closed:
            self._closed = True
            self._requests.put(None)

    def cancel(self) -> None:
        """Abandon the stream now: pending responses are dropped."""
        self.close()
        self._call.cancel()

    def receive(self) -> StreamResponse:
        """The next response; raises StopIteration when the stream has ended."""
        return next(self)

    def __iter__(self) -> Iterator[StreamResponse]:
        return self

    def __next__(self) -> StreamResponse:
        try:
            message = next(self._call)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return _base.stream_response(message)

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Nobody will read what is still in flight: free the server's work.
        self.cancel()
