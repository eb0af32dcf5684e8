"""TLS/mTLS credentials and bearer-token auth, both reloaded when their files change.

Certificates: gRPC calls ``_CertificateFiles.fetch`` before each TLS
handshake; a changed certificate, key or client CA is read, checked (the key
must match the certificate) and used for new connections from then on, while
open connections keep the one they were made with. A half-written or
mismatched pair is never handed to gRPC: the previous one stays in use until
the files agree again.

Tokens: ``TokenStore`` holds the tokens of ``--auth-token-file`` plus
``LOCKGATE_AUTH_TOKENS`` and re-reads the file when it changes (checked at
most once a second), so tokens rotate without a restart. Tokens are kept and
compared as SHA-256 digests, in constant time, against every known token.
A token is checked when a call starts and, on streams, again before each
message, so a revoked token stops working on streams opened before too.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from lockgate.config import ServerConfig
from lockgate.errors import TokenRevokedError

log = logging.getLogger("lockgate.security")

if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler

#: RPCs that never need a token: probes must work without secrets. They say
#: only whether the server (or a model, by health service name) is up.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)
#: RPCs that change what the server serves: need a token with "control".
CONTROL_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)
#: RPCs that map client memory into the server: need "shm" (or "control").
#: A registered region is readable and writable by every request naming it.
SHARED_MEMORY_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
        "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
        "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
    }
)
#: ``infer``: inference, metadata, statistics, index. ``shm``: register,
#: unregister and list shared-memory regions. ``control`` also allows
#: load/unload and implies both.
SCOPES = frozenset({"infer", "shm", "control"})
ENV_TOKENS = "LOCKGATE_AUTH_TOKENS"
#: The token file is stat()ed at most this often (seconds).
TOKEN_RECHECK_S = 1.0

#: Denials say no more than this: neither which token nor why it failed.
UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
PERMISSION_DENIED = (grpc.StatusCode.PERMISSION_DENIED, "this token may not make this call")


class SecurityConfigError(ValueError):
    """TLS files or token definitions that the server cannot start with."""


def _stamp(paths: list[Path]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is rewritten or replaced (by rename, too)."""
    stats = [p.stat() for p in paths]
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)


# --- TLS -------------------------------------------------------------------------------------


class _CertificateFiles:
    """Hands gRPC a new certificate configuration whenever the files change."""

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), client_ca
        self.paths = [self.cert, self.key] + ([Path(client_ca)] if client_ca else [])
        self._stamp = _stamp(self.paths)
        #: The files as they were when a reload last failed: said once, not per handshake.
        self._rejected: tuple[tuple[int, int, int], ...] = ()

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """The files' contents, once the key is known to match the certificate."""
        contents = self._contents()
        try:
            # The ssl module checks that the key belongs to the certificate.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            # An empty password: an encrypted key fails here instead of
            # prompting on the terminal (gRPC cannot use one either).
            context.load_cert_chain(self.cert, self.key, password=b"")
            if self.client_ca:
                context.load_verify_locations(self.client_ca)
        except ssl.SSLError as exc:
            raise SecurityConfigError(f"TLS files do not form a usable pair: {exc}") from None
        if self._contents() != contents:  # changed while being checked: not yet
            raise SecurityConfigError("TLS files changed while being read")
        return contents

    def _contents(self) -> tuple[bytes, bytes, bytes | None]:
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return self.cert.read_bytes(), self.key.read_bytes(), ca

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake; None keeps the current one."""
        stamp: tuple[tuple[int, int, int], ...] = ()
        try:
            stamp = _stamp(self.paths)
            if stamp == self._stamp:
                return None
            config = self.configuration()
        except (OSError, SecurityConfigError) as exc:
            # The stamp is kept: the next handshake tries again, so a
            # certificate and key written one after the other are picked up
            # together as soon as both are there.
            if stamp != self._rejected:
                self._rejected = stamp
                log.error("cannot reload TLS files, keeping the current ones: %s", exc)
            return None
        self._stamp = stamp
        log.info("TLS certificate files changed: reloaded")
        return config


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext."""
    if not config.tls_cert and not config.tls_key:
        if config.tls_client_ca:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise SecurityConfigError("--tls-cert and --tls-key must be given together")
    files = _CertificateFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(),
        files.fetch,  # type: ignore[arg-type]  # gRPC documents None as 'no change'
        require_client_authentication=bool(config.tls_client_ca),
    )


# --- bearer tokens ---------------------------------------------------------------------------


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def parse_tokens(lines: list[str], source: str) -> dict[str, frozenset[str]]:
    """``TOKEN [infer|shm|control|infer,shm,...]`` lines; '#' starts a comment line.

    A token without scopes may infer but not load/unload models.
    """
    tokens: dict[str, frozenset[str]] = {}
    for number, line in enumerate(lines, 1):
        fields = line.strip().split(None, 1)
        if not fields or fields[0].startswith("#"):
            continue
        token = fields[0]
        scopes = frozenset(
            s.strip() for s in (fields[1] if len(fields) > 1 else "infer").split(",") if s.strip()
        )
        unknown = scopes - SCOPES
        if unknown or not scopes:
            # Never echo the line: it holds a secret.
            raise SecurityConfigError(
                f"{source} line {number}: scopes must be among {sorted(SCOPES)}, "
                f"got {sorted(unknown) or 'none'}"
            )
        tokens[token] = scopes
    return tokens


def load_tokens(path: str | None) -> dict[str, frozenset[str]]:
    """Tokens from a file (one per line: ``TOKEN [infer,control]``) and LOCKGATE_AUTH_TOKENS.

    Several tokens may be valid at once, so they can be rotated without
    downtime. The environment variable separates its entries with ';'.
    """
    tokens: dict[str, frozenset[str]] = {}
    env = os.environ.get(ENV_TOKENS, "")
    tokens.update(parse_tokens([t for t in env.split(";") if t.strip()], ENV_TOKENS))
    if path:
        tokens.update(parse_tokens(Path(path).read_text().splitlines(), path))
    return tokens


class TokenStore:
    """The valid tokens, re-read from the token file when it changes."""

    def __init__(self, path: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = Path(path) if path else None
        self._clock = clock
        self._stamp = _stamp([self._path]) if self._path else ()
        self._digests = self._load()
        self._checked = clock()
        self._error = ""

    def _load(self) -> list[tuple[bytes, frozenset[str]]]:
        tokens = load_tokens(str(self._path) if self._path else None)
        return [(_digest(t.encode()), scopes) for t, scopes in tokens.items()]

    def __len__(self) -> int:
        return len(self._digests)

    def _refresh(self) -> None:
        now = self._clock()
        if self._path is None or now - self._checked < TOKEN_RECHECK_S:
            return
        self._checked = now
        try:
            stamp = _stamp([self._path])
            if stamp == self._stamp:
                return
            digests = self._load()
        except (OSError, UnicodeDecodeError, SecurityConfigError) as exc:
            # Keep the tokens we have; try again at the next check (said once).
            if str(exc) != self._error:
                self._error = str(exc)
                log.error("cannot reload the token file, keeping the current tokens: %s", exc)
            return
        self._stamp = stamp
        self._digests = digests
        self._error = ""
        log.info("token file changed: %d token(s) now valid", len(digests))

    def scopes(self, presented: bytes) -> frozenset[str] | None:
        """The scopes of ``presented``, or None when it is no valid token."""
        self._refresh()
        given = _digest(presented)
        found: frozenset[str] | None = None
        # Compare against every token, in constant time, so timing reveals
        # neither which token matched nor how much of one.
        for digest, scopes in self._digests:
            if hmac.compare_digest(given, digest):
                found = scopes
        return found


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks ``authorization: Bearer <token>`` on every RPC except health."""

    def __init__(self, tokens: TokenStore) -> None:
        self._store = tokens

    @staticmethod
    def _token(metadata: tuple[tuple[str, str | bytes], ...]) -> bytes | None:
        for key, value in metadata:
            if key != "authorization":
                continue
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, presented = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not presented.strip():
                return None
            return presented.strip().encode()
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = details.method
        if method in OPEN_METHODS:
            return await continuation(details)
        token = self._token(tuple(details.invocation_metadata or ()))
        scopes = self._store.scopes(token) if token is not None else None
        if token is None or scopes is None:
            return _DENY_UNAUTHENTICATED
        if method in CONTROL_METHODS:
            needed = "control"
        elif method in SHARED_MEMORY_METHODS:
            needed = "shm"
        else:
            needed = "infer"
        if not _allows(scopes, needed):
            return _DENY_PERMISSION
        handler = await continuation(details)
        if handler is not None and handler.request_streaming:
            return _rechecked(handler, self._store, token, needed)
        return handler


def _allows(scopes: frozenset[str], needed: str) -> bool:
    return needed in scopes or "control" in scopes


def _rechecked(handler: Handler, store: TokenStore, token: bytes, needed: str) -> Handler:
    """``handler`` with the token checked again before each message of the stream.

    A stream may stay open for hours: a token revoked (removed from the token
    file) stops working on streams opened before, at their next message.
    """
    behavior: Any = handler.stream_stream
    assert behavior is not None

    async def checked(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def still_allowed() -> Any:
            async for request in requests:
                scopes = store.scopes(token)
                if scopes is None or not _allows(scopes, needed):
                    raise TokenRevokedError(UNAUTHENTICATED[1])
                yield request

        async for response in behavior(still_allowed(), context):
            yield response

    return grpc.stream_stream_rpc_method_handler(
        checked,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _denial(code: grpc.StatusCode, message: str) -> Handler:
    """A handler that refuses any call, of any shape, without reading its messages.

    Streaming both ways fits every RPC kind; no deserializer runs, so nothing
    a caller without a token sends is ever parsed.
    """

    async def abort(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(abort)


_DENY_UNAUTHENTICATED = _denial(*UNAUTHENTICATED)
_DENY_PERMISSION = _denial(*PERMISSION_DENIED)


def auth_interceptors(config: ServerConfig) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """The token check, when a token file or LOCKGATE_AUTH_TOKENS is configured.

    A configured but empty token file denies every call: it never turns
    authentication off.
    """
    if not config.auth_token_file and not os.environ.get(ENV_TOKENS, "").strip():
        return []
    store = TokenStore(config.auth_token_file)
    if not len(store):
        log.warning("authentication is on but no token is valid: every call is refused")
    return [TokenAuthInterceptor(store)]
