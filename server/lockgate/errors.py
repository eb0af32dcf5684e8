"""Lockgate's error kinds and their one mapping to gRPC status codes.

Code anywhere below the servicer raises a ``LockgateError`` subclass; the
servicer translates it at the edge (``servicer._abort``). The kind decides
the status code, so a missing model and a crashed one never look alike.
"""

from __future__ import annotations

import grpc

#: Longest client-chosen string (model name, request id, version...) echoed
#: into a message or a log line.
CLIP_CHARS = 128
#: Longest status message: gRPC sends it as metadata, whose default limit is
#: 8 KiB; a longer one would turn the intended status into RESOURCE_EXHAUSTED.
MAX_MESSAGE_CHARS = 2048


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


#: Every ``reason`` a request to a loaded model can fail with (status code names).
#: /metrics shows ``nv_inference_request_failure`` for each from the start, at
#: zero: a series that appears only at the first failure leaves rate() and the
#: dashboard's sums empty on a healthy server.
FAILURE_REASONS = (
    "INVALID_ARGUMENT",
    "UNIMPLEMENTED",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "UNAVAILABLE",
    "INTERNAL",
)


class LockgateError(Exception):
    """Base class: an error with a message meant for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message

    @property
    def reason(self) -> str:
        """Short label for metrics (``nv_inference_request_failure{reason}``)."""
        return self.code.name


class InternalError(LockgateError):
    """A bug of ours, caught at the edge so that the server keeps serving."""

    code = grpc.StatusCode.INTERNAL


class TokenRevokedError(LockgateError):
    """The token a stream was opened with is no longer valid."""

    code = grpc.StatusCode.UNAUTHENTICATED


class InvalidInputError(LockgateError):
    """The request is malformed: wrong datatype, shape, size, names..."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFoundError(LockgateError):
    """No such model, or no such version of it."""

    code = grpc.StatusCode.NOT_FOUND


class RegionNotFoundError(LockgateError):
    """No shared-memory region is registered under that name."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(LockgateError):
    """A shared-memory region of that name is registered already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class TooManyRegionsError(LockgateError):
    """The server holds as many shared-memory regions as it allows."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ModelUnavailableError(LockgateError):
    """The model exists but is not ready (loading, failed, unloading, draining)."""

    code = grpc.StatusCode.UNAVAILABLE


class LoadAbandonedError(ModelUnavailableError):
    """A model load given up because the server is stopping."""


class QueueFullError(LockgateError):
    """The model's queue is at ``max_queue_size``: rejected at once."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RequestTimeoutError(LockgateError):
    """The request's deadline or queue timeout passed before it ran."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class RequestCancelledError(LockgateError):
    """The caller went away before the request ran."""

    code = grpc.StatusCode.CANCELLED


class ExecutionError(LockgateError):
    """ONNX Runtime rejected the inputs while running the model.

    Reported as INVALID_ARGUMENT: every case we can trigger comes from the
    request's data (an out-of-range index, a shape the graph cannot take).
    """

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotAllowedError(LockgateError):
    """The operation is switched off by the server's configuration."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnsupportedError(LockgateError):
    """A protocol feature Lockgate does not implement."""

    code = grpc.StatusCode.UNIMPLEMENTED


class ModelLoadError(LockgateError):
    """A model could not be loaded; the reason goes to RepositoryIndex."""

    code = grpc.StatusCode.INVALID_ARGUMENT
