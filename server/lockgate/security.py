"""TLS/mTLS credentials (reloaded when the files change) and bearer-token auth."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from lockgate.config import ServerConfig

log = logging.getLogger("lockgate.security")

if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler

#: RPCs that never need a token: probes must work without secrets.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
    }
)
#: RPCs that change what the server serves: need a token with "control".
CONTROL_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)


class _CertificateFiles:
    """Hands gRPC a new certificate configuration whenever the files change."""

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self.paths = [Path(p) for p in (cert, key, client_ca) if p]
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._mtimes()

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(p.stat().st_mtime_ns for p in self.paths)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        key = Path(self.key).read_bytes()
        cert = Path(self.cert).read_bytes()
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake; None keeps the current one."""
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            config = self.configuration()
        except OSError as exc:
            log.error("cannot reload TLS files, keeping the current ones: %s", exc)
            return None
        self._stamp = stamp
        log.info("TLS certificate files changed: reloaded")
        return config


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext."""
    if not config.tls_cert and not config.tls_key:
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("--tls-cert and --tls-key must be given together")
    files = _CertificateFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(),
        files.fetch,  # type: ignore[arg-type]  # gRPC documents None as 'no change'
        require_client_authentication=bool(config.tls_client_ca),
    )


def load_tokens(path: str | None) -> dict[str, frozenset[str]]:
    """Tokens from a file (one per line: ``TOKEN [infer,control]``) or LOCKGATE_AUTH_TOKENS.

    Several tokens may be valid at once, so they can be rotated without
    downtime. A token without scopes may infer but not load/unload models.
    """
    lines: list[str] = []
    if path:
        lines += Path(path).read_text().splitlines()
    lines += [t for t in os.environ.get("LOCKGATE_AUTH_TOKENS", "").split(";") if t]
    tokens: dict[str, frozenset[str]] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token, _, scopes = line.partition(" ")
        tokens[token] = frozenset(s.strip() for s in (scopes or "infer").split(",") if s.strip())
    return tokens


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks ``authorization: Bearer <token>`` on every RPC except health."""

    def __init__(self, tokens: dict[str, frozenset[str]]) -> None:
        self._tokens = [(t.encode(), scopes) for t, scopes in tokens.items()]

    def _scopes(self, metadata: tuple[tuple[str, str | bytes], ...]) -> frozenset[str] | None:
        for key, value in metadata:
            if key != "authorization":
                continue
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, presented = text.partition(" ")
            if scheme.lower() != "bearer":
                return None
            given = presented.strip().encode()
            found: frozenset[str] | None = None
            # Compare against every token, in constant time, so timing
            # reveals neither which token matched nor how much of one.
            for token, scopes in self._tokens:
                if hmac.compare_digest(given, token):
                    found = scopes
            return found
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = details.method
        if method in OPEN_METHODS or method.startswith("/grpc.reflection."):
            return await continuation(details)
        scopes = self._scopes(tuple(details.invocation_metadata or ()))  # type: ignore[arg-type]
        if scopes is None:
            denial = (grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        elif ("control" if method in CONTROL_METHODS else "infer") in scopes or "control" in scopes:
            return await continuation(details)
        else:
            denial = (grpc.StatusCode.PERMISSION_DENIED, "this token may not make this call")
        handler = await continuation(details)
        return _deny(handler, *denial)


def _deny(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of the same shape as ``handler`` that only aborts."""

    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)  # type: ignore[arg-type]
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)  # type: ignore[arg-type]
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
