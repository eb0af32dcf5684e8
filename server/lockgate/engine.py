"""The one interface between the gRPC front end and the models: ``Engine``.

The servicer asks an ``Engine`` for everything below the wire: which model
version serves a request, its metadata, config and statistics, the
repository index, loads and unloads. ``LocalEngine`` answers in-process from
the ``ModelRepository``, at the cost of a direct call. A multi-process server
(front ends apart from the process that owns the models) implements the same
protocol over IPC, and the servicer never asks which kind it has.

The hot path uses ``model(name, version)`` and then the returned
``ServedModel``: its tensor specs and limits to decode and encode, ``infer``
to run. Everything a front end needs per model is fixed when the version
loads, so a remote implementation caches it per version
(``lockgate.remote_engine``, for ``--frontends N``): ``model`` answers from
that cache and returns None on a miss, which ``lookup`` then settles by
asking the engine process; the other questions are coroutines for the same
reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from lockgate.codec import Limits, TensorSpec
from lockgate.errors import ModelNotFoundError, ModelUnavailableError
from lockgate.repository import ModelRepository
from lockgate.request import InferRequest, Outputs
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import model_config_pb2 as mc

#: (name, version, state, reason): one RepositoryIndex row.
IndexRow = tuple[str, str, str, str]


class ServedModel(Protocol):
    """A ready model version, as the front end sees it: specs to decode and encode, infer."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def inputs(self) -> dict[str, TensorSpec]: ...
    @property
    def output_names(self) -> frozenset[str]: ...
    @property
    def output_order(self) -> list[str]: ...
    @property
    def output_datatypes(self) -> dict[str, str]: ...
    @property
    def limits(self) -> Limits: ...

    async def infer(self, request: InferRequest) -> Outputs:
        """Run ``request`` (decoded) through the model's scheduler; its outputs."""
        ...

    def record_failure(self, reason: str, duration_ns: int) -> None:
        """Count a request the front end refused before it reached the model.

        Thread-safe: large requests are decoded in a worker thread.
        """
        ...

    def release(self, outputs: Outputs) -> None:
        """``outputs`` are encoded: memory they view may be reused."""
        ...


class Engine(Protocol):
    """What the servicer needs of the model layer. Errors are ``LockgateError``s."""

    def model(self, name: str, version: str = "") -> ServedModel | None:
        """The ready version a request for ``name`` (and ``version``) should use.

        None when this engine cannot tell without asking: call ``lookup``.
        """
        ...

    async def lookup(self, name: str, version: str = "") -> ServedModel:
        """Like ``model``, settled: the version, or the typed error of the miss."""
        ...

    async def model_ready(self, name: str, version: str = "") -> bool:
        """Whether that version is ready; a malformed version raises InvalidInputError."""
        ...

    async def metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse: ...

    async def model_config(self, name: str, version: str = "") -> mc.ModelConfig: ...

    async def statistics(self, name: str = "", version: str = "") -> list[pb.ModelStatistics]:
        """Statistics of one version, of every ready version of ``name``, or of all."""
        ...

    async def index(self, ready_only: bool = False) -> list[IndexRow]: ...

    async def load(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None: ...

    async def unload(self, name: str, unload_dependents: bool = False) -> None: ...


class LocalEngine:
    """The in-process ``Engine``: the repository and its model versions, called directly.

    ``on_change`` runs after every load or unload (successful or not), so the
    server's health and readiness follow the models.
    """

    def __init__(
        self, repository: ModelRepository, on_change: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._repository = repository
        self._on_change = on_change

    def model(self, name: str, version: str = "") -> ServedModel:
        return self._repository.get(name, version)

    async def lookup(self, name: str, version: str = "") -> ServedModel:
        return self._repository.get(name, version)

    async def model_ready(self, name: str, version: str = "") -> bool:
        # Missing or not ready is an answer (ready=false), as in Triton; a
        # malformed version is the caller's mistake and raises.
        try:
            self._repository.get(name, version)
        except (ModelNotFoundError, ModelUnavailableError):
            return False
        return True

    async def metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        model = self._repository.get(name, version)
        response = model.metadata()
        if not version:
            del response.versions[:]
            response.versions.extend(
                m.version for m in self._repository.ready_models() if m.name == model.name
            )
        return response

    async def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        return self._repository.get(name, version).config

    async def statistics(self, name: str = "", version: str = "") -> list[pb.ModelStatistics]:
        if name and version:
            models = [self._repository.get(name, version)]
        elif name:
            self._repository.get(name)  # NOT_FOUND/UNAVAILABLE as for infer
            models = [m for m in self._repository.ready_models() if m.name == name]
        else:
            models = self._repository.ready_models()
        return [m.stats.to_proto() for m in models]

    async def index(self, ready_only: bool = False) -> list[IndexRow]:
        # States as their names: what crosses the hop, and what the wire takes.
        return [(n, v, str(s), r) for n, v, s, r in self._repository.index(ready_only)]

    async def load(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        try:
            await self._repository.load(name, config_json, files)
        finally:
            await self._changed()

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        try:
            await self._repository.unload(name, unload_dependents)
        finally:
            await self._changed()

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()
