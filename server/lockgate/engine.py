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
loads, so a remote implementation can cache it per version.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from lockgate.codec import Limits, TensorSpec
from lockgate.errors import ModelNotFoundError, ModelUnavailableError
from lockgate.model import ModelState
from lockgate.repository import ModelRepository
from lockgate.request import InferRequest, Outputs
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import model_config_pb2 as mc

#: (name, version, state, reason): one RepositoryIndex row.
IndexRow = tuple[str, str, ModelState, str]


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
        """Count a request the front end refused before it reached the model."""
        ...


class Engine(Protocol):
    """What the servicer needs of the model layer. Errors are ``LockgateError``s."""

    def model(self, name: str, version: str = "") -> ServedModel:
        """The ready version a request for ``name`` (and ``version``) should use."""
        ...

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether that version is ready; a malformed version raises InvalidInputError."""
        ...

    def metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse: ...

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig: ...

    def statistics(self, name: str = "", version: str = "") -> list[pb.ModelStatistics]:
        """Statistics of one version, of every ready version of ``name``, or of all."""
        ...

    def index(self, ready_only: bool = False) -> list[IndexRow]: ...

    async def load(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None: ...

    async def unload(self, name: str) -> None: ...


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

    def model_ready(self, name: str, version: str = "") -> bool:
        # Missing or not ready is an answer (ready=false), as in Triton; a
        # malformed version is the caller's mistake and raises.
        try:
            self._repository.get(name, version)
        except (ModelNotFoundError, ModelUnavailableError):
            return False
        return True

    def metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        model = self._repository.get(name, version)
        response = model.metadata()
        if not version:
            del response.versions[:]
            response.versions.extend(
                m.version for m in self._repository.ready_models() if m.name == model.name
            )
        return response

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        return self._repository.get(name, version).config

    def statistics(self, name: str = "", version: str = "") -> list[pb.ModelStatistics]:
        if name and version:
            models = [self._repository.get(name, version)]
        elif name:
            self._repository.get(name)  # NOT_FOUND/UNAVAILABLE as for infer
            models = [m for m in self._repository.ready_models() if m.name == name]
        else:
            models = self._repository.ready_models()
        return [m.stats.to_proto() for m in models]

    def index(self, ready_only: bool = False) -> list[IndexRow]:
        return self._repository.index(ready_only)

    async def load(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        try:
            await self._repository.load(name, config_json, files)
        finally:
            await self._changed()

    async def unload(self, name: str) -> None:
        try:
            await self._repository.unload(name)
        finally:
            await self._changed()

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()
