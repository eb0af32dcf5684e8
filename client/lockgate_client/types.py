"""Types the SDK returns.

Control-plane calls return the protocol's own protobuf messages (typed by
their ``.pyi`` stubs), so every field a server sends is available and nothing
is lost in translation; the aliases below give them stable public names.
Inference returns plain ``dict[str, numpy.ndarray]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from lockgate_client._proto import grpc_service_pb2 as _pb
from lockgate_client._proto import model_config_pb2 as _mc
from lockgate_client.errors import LockgateError

__all__ = [
    "ModelConfig",
    "ModelIndex",
    "ModelMetadata",
    "ModelStatistics",
    "Outputs",
    "RegionStatus",
    "ServerMetadata",
    "StreamResponse",
]

#: ``server_metadata()``: ``name``, ``version``, ``extensions``.
ServerMetadata: TypeAlias = _pb.ServerMetadataResponse
#: ``metadata(model)``: ``name``, ``versions``, ``platform``, ``inputs``/``outputs``
#: (each with ``name``, ``datatype``, ``shape``; -1 marks a variable dimension).
ModelMetadata: TypeAlias = _pb.ModelMetadataResponse
#: ``config(model)``: Triton's ``ModelConfig`` (``max_batch_size``, ``input``, ...).
ModelConfig: TypeAlias = _mc.ModelConfig
#: One entry of ``statistics()``: counts and cumulative durations of one version.
ModelStatistics: TypeAlias = _pb.ModelStatistics
#: One entry of ``models()``: ``name``, ``version``, ``state``, ``reason``.
ModelIndex: TypeAlias = _pb.RepositoryIndexResponse.ModelIndex
#: One entry of ``shared_memory_status()``: ``name``, ``key``, ``offset``, ``byte_size``.
RegionStatus: TypeAlias = _pb.SystemSharedMemoryStatusResponse.RegionStatus
#: What ``infer`` returns: output name -> array.
Outputs: TypeAlias = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class StreamResponse:
    """One response read from an inference stream.

    Attributes:
        id: the ``request_id`` of the request it answers ("" if the server sent none).
        outputs: the decoded outputs; empty when ``error`` is set.
        error: the in-band failure of that request, or None.
        model: the model name the server reported.
        version: the model version the server reported.
    """

    id: str
    outputs: Outputs = field(default_factory=dict)
    error: LockgateError | None = None
    model: str = ""
    version: str = ""

    @property
    def ok(self) -> bool:
        """True when the request succeeded."""
        return self.error is None

    def result(self) -> Outputs:
        """The outputs, or raise the request's error."""
        if self.error is not None:
            raise self.error
        return self.outputs

    def __getitem__(self, name: str) -> npt.NDArray[np.generic]:
        """``response["OUTPUT0"]``: shorthand for ``response.result()["OUTPUT0"]``."""
        return self.result()[name]
