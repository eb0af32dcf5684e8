"""grpc.health.v1, bounded: probes need it without a token, so anyone may call it.

Requests larger than any service name Lockgate publishes are refused before
they are parsed, and the number of concurrent ``Watch`` streams is capped, so
a caller without a token cannot make the server hold memory through health.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

#: Largest HealthCheckRequest accepted: service names are model names, and a
#: request is the name plus a few bytes of framing.
MAX_HEALTH_REQUEST_BYTES = 1024

Context = grpc.aio.ServicerContext[Any, Any]


class HealthServicer(health.aio.HealthServicer):  # type: ignore[name-defined,misc]
    """gRPC's asyncio health servicer with at most ``max_watches`` Watch streams."""

    def __init__(self, max_watches: int) -> None:
        super().__init__()
        self._max_watches = max_watches
        self._watches = 0

    async def Watch(self, request: Any, context: Context) -> None:
        if self._watches >= self._max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._watches} health Watch streams are open, the server's limit "
                "(--max-health-watches); poll Check instead, or retry later",
            )
        self._watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self._watches -= 1


def add_health_to_server(servicer: HealthServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` with its requests' size checked before parsing."""
    health_pb2_grpc.add_HealthServicer_to_server(servicer, _BoundedRegistrar(server))


class _Oversized:
    """Stands in for a request too large to be a health check."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _BoundedRegistrar:
    """Receives the generated code's handlers; registers size-checked ones."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        del handlers  # the same methods, registered bounded below

    def add_registered_method_handlers(
        self, name: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        bounded = {method: _bounded(handler) for method, handler in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(name, bounded),)
        )
        self._server.add_registered_method_handlers(name, bounded)  # type: ignore[attr-defined]


def _bounded(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    parse = handler.request_deserializer
    assert parse is not None

    def bounded_parse(data: bytes) -> Any:
        if len(data) > MAX_HEALTH_REQUEST_BYTES:
            return _Oversized(len(data))
        return parse(data)

    streaming = handler.unary_stream is not None
    behavior: Any = handler.unary_stream if streaming else handler.unary_unary
    assert behavior is not None

    async def guarded(request: Any, context: Context) -> Any:
        if isinstance(request, _Oversized):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"health request of {request.size} bytes refused: at most "
                f"{MAX_HEALTH_REQUEST_BYTES} bytes (a service name is a model name)",
            )
        return await behavior(request, context)

    make = (
        grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
    )
    return make(  # type: ignore[operator]
        guarded,
        request_deserializer=bounded_parse,
        response_serializer=handler.response_serializer,
    )
