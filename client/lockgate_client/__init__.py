"""Python SDK for Lockgate and any KServe v2 / Triton gRPC inference server.

>>> from lockgate_client import Client
>>> with Client("127.0.0.1:8001") as client:
...     outputs = client.infer("simple", {"INPUT0": a, "INPUT1": b})

See ``docs/sdk.md`` for the full guide.
"""

from lockgate_client._retry import RetryPolicy
from lockgate_client._shm import SharedMemoryRegion, SharedOutput, SharedTensor
from lockgate_client.aio import AsyncClient, AsyncStream
from lockgate_client.client import Client, Stream
from lockgate_client.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InferenceError,
    InternalError,
    InvalidInputError,
    LockgateError,
    ModelNotFoundError,
    PermissionDeniedError,
    ProtocolError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
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

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InferenceError",
    "InternalError",
    "InvalidInputError",
    "LockgateError",
    "ModelConfig",
    "ModelIndex",
    "ModelMetadata",
    "ModelNotFoundError",
    "ModelStatistics",
    "Outputs",
    "PermissionDeniedError",
    "ProtocolError",
    "RegionStatus",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServerMetadata",
    "SharedMemoryRegion",
    "SharedOutput",
    "SharedTensor",
    "Stream",
    "StreamResponse",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
]
