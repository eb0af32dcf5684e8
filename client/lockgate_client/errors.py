"""The SDK's exceptions: one class per gRPC status code the caller may act on.

Every failure the server reports arrives as a :class:`LockgateError` subclass
chosen by its status code, so callers catch the kind they care about
(``except ModelNotFoundError``) instead of comparing codes. The hierarchy is
flat: every class derives directly from ``LockgateError``.

Streaming inference reports per-request failures in-band (the stream stays
open) as text only; those become :class:`InferenceError`, whose code is parsed
from a leading ``"[CODE] "`` tag when the server adds one.
"""

from __future__ import annotations

import re
from typing import Final

import grpc

__all__ = [
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InferenceError",
    "InternalError",
    "InvalidInputError",
    "LockgateError",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "error_from_code",
    "error_from_rpc",
    "error_from_stream_message",
]


class LockgateError(Exception):
    """Base class of every error the SDK raises for a failed call.

    Attributes:
        code: the gRPC status code (``grpc.StatusCode.UNKNOWN`` when none applies).
        message: the server's message, unchanged.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str, code: grpc.StatusCode | None = None, *, request_id: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else type(self).code
        #: The request's ``id`` when the error belongs to one (streaming), else "".
        self.request_id = request_id

    def __str__(self) -> str:
        return f"[{self.code.name}] {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name})"


class ModelNotFoundError(LockgateError):
    """No such model or version, or no shared-memory region of that name (``NOT_FOUND``)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(LockgateError):
    """A shared-memory region of that name is registered already (``ALREADY_EXISTS``)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidInputError(LockgateError):
    """The request was malformed: names, datatypes, shapes... (``INVALID_ARGUMENT``)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnavailableError(LockgateError):
    """The server or model cannot take requests right now (``UNAVAILABLE``); retryable."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(LockgateError):
    """The call's deadline or queue timeout passed (``DEADLINE_EXCEEDED``)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhaustedError(LockgateError):
    """A queue or size limit rejected the request (``RESOURCE_EXHAUSTED``)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RequestCancelledError(LockgateError):
    """The call was cancelled (``CANCELLED``)."""

    code = grpc.StatusCode.CANCELLED


class UnauthenticatedError(LockgateError):
    """Missing or invalid credentials (``UNAUTHENTICATED``)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LockgateError):
    """The credentials do not allow this call (``PERMISSION_DENIED``)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPreconditionError(LockgateError):
    """The server refuses the operation in its current configuration (``FAILED_PRECONDITION``)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnimplementedError(LockgateError):
    """The server does not implement this call or feature (``UNIMPLEMENTED``)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(LockgateError):
    """The server failed while handling the request (``INTERNAL``)."""

    code = grpc.StatusCode.INTERNAL


class InferenceError(LockgateError):
    """A streamed request failed; the stream itself stays open.

    The code is parsed from the message's ``"[CODE] "`` prefix when present,
    otherwise it is ``UNKNOWN``.
    """


class ProtocolError(LockgateError):
    """The server's reply does not follow the KServe v2 protocol (bad tensor sizes...)."""

    code = grpc.StatusCode.UNKNOWN


_BY_CODE: Final[dict[grpc.StatusCode, type[LockgateError]]] = {
    cls.code: cls
    for cls in (
        ModelNotFoundError,
        AlreadyExistsError,
        InvalidInputError,
        UnavailableError,
        DeadlineExceededError,
        ResourceExhaustedError,
        RequestCancelledError,
        UnauthenticatedError,
        PermissionDeniedError,
        FailedPreconditionError,
        UnimplementedError,
        InternalError,
    )
}

_CODE_PREFIX = re.compile(r"^\[([A-Z_]+)\]\s?")


def error_from_code(code: grpc.StatusCode, message: str, *, request_id: str = "") -> LockgateError:
    """Build the ``LockgateError`` subclass that stands for ``code``."""
    cls = _BY_CODE.get(code, LockgateError)
    return cls(message, code, request_id=request_id)


def error_from_rpc(error: grpc.RpcError) -> LockgateError:
    """Translate a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    # Both carry code()/details() when they come from a call; a bare RpcError
    # (raised by some interceptors) may not, so read them defensively.
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_from_code(code, str(details) if details else code.name)


def error_from_stream_message(message: str, request_id: str = "") -> InferenceError:
    """Build the error for an in-band streaming failure, keeping the server's text."""
    code = grpc.StatusCode.UNKNOWN
    match = _CODE_PREFIX.match(message)
    if match:
        code = getattr(grpc.StatusCode, match.group(1), grpc.StatusCode.UNKNOWN)
        message = message[match.end() :]
    return InferenceError(message, code, request_id=request_id)
