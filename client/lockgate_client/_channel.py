"""Channel settings shared by ``Client`` and ``AsyncClient``: target, TLS, options, metadata."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import grpc.aio

__all__ = ["ChannelSettings", "PemSource", "build_target"]

#: PEM data, or the path of a file holding it.
PemSource = bytes | str | Path

#: gRPC's own cap: a message length is a signed 32-bit int.
MAX_MESSAGE_BYTES: Final = 2**31 - 1

# round_robin spreads calls over every address the name resolves to (all
# replicas behind a headless Service, or every endpoint given); gRPC's
# default, pick_first, would send everything to the first one.
# healthCheckConfig (gRFC A17) has gRPC watch each replica's grpc.health.v1
# status and leave a replica out of the rotation the moment it reports
# NOT_SERVING, i.e. when it starts to drain: calls stop going to a replica that
# would only refuse them. A server without the health service counts as healthy.
# Only where there is a choice of replicas: with one server, is_ready() must
# still reach it and say False rather than fail.
_SERVICE_CONFIG: Final = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_SERVICE_CONFIG_CHECKED: Final = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)

_COMPRESSION: Final = {"gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate}


def build_target(url: str | Sequence[str]) -> str:
    """Turn one address or several into a gRPC target name.

    One string passes through (``host:port``, ``dns:///name:port``,
    ``unix:path``...). Several ``ip:port`` endpoints become one
    ``ipv4:``/``ipv6:`` target, which gRPC resolves to all of them.
    """
    if isinstance(url, str):
        return _strip_scheme(url)
    endpoints = [_strip_scheme(u) for u in url]
    if not endpoints:
        raise ValueError("no endpoint given")
    if len(endpoints) == 1:
        return endpoints[0]
    versions = {_ip_version(e) for e in endpoints}
    if versions == {4}:
        return "ipv4:" + ",".join(endpoints)
    if versions == {6}:
        return "ipv6:" + ",".join(endpoints)
    raise ValueError(
        "several endpoints must all be IPv4 or all IPv6 'address:port' literals; "
        "for host names use one 'dns:///name:port' target that resolves to every replica"
    )


def _strip_scheme(url: str) -> str:
    # Accept the URL forms people paste from HTTP tooling; gRPC wants none.
    for prefix in ("grpc://", "http://"):
        if url.startswith(prefix):
            return url[len(prefix) :].rstrip("/")
    return url


def _ip_version(endpoint: str) -> int | None:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        return ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return None


def _read_pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


@dataclass(frozen=True)
class ChannelSettings:
    """Everything needed to open a channel and decorate its calls."""

    target: str
    tls: bool | PemSource = False
    client_cert: PemSource | None = None
    client_key: PemSource | None = None
    server_name: str | None = None
    token: str | None = None
    compression: str | None = None
    keepalive: float | None = 60.0
    metadata: tuple[tuple[str, str], ...] = ()
    #: Channels the client opens and spreads its calls over, each with its own
    #: connection to every endpoint.
    connections: int = 1

    @property
    def replicated(self) -> bool:
        """Whether the target may name several replicas (a list or a DNS name)."""
        return self.target.startswith(("ipv4:", "ipv6:", "dns:")) and (
            "," in self.target or self.target.startswith("dns:")
        )

    def options(self) -> list[tuple[str, int | str]]:
        """Channel arguments: message sizes, load balancing, keepalive, reconnects."""
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            (
                "grpc.service_config",
                _SERVICE_CONFIG_CHECKED if self.replicated else _SERVICE_CONFIG,
            ),
            # Reconnect soon after a replica comes back: the default backoff
            # grows to 120 s, during which calls fail fast without trying.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # Re-resolve DNS names quickly so new replicas join the rotation.
            ("grpc.dns_min_time_between_resolutions_ms", 5000),
            # A connection of this channel's own: by default gRPC gives every
            # channel of a process with the same target and arguments one
            # shared connection, so clients (and ``connections``) would all
            # reach the one server process that accepted it (`--frontends N`).
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self.keepalive is not None:
            # Pings only while calls are open: servers (Triton's defaults
            # too) punish idle pings more often than every 5 minutes.
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive * 1000)),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 0),
            ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    @property
    def secure(self) -> bool:
        return self.tls is not False or self.client_cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials: system roots or the given CA; a client pair for mTLS."""
        roots = None if isinstance(self.tls, bool) else _read_pem(self.tls)
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mTLS needs both client_cert and client_key")
        return grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=_read_pem(self.client_key),
            certificate_chain=_read_pem(self.client_cert),
        )

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata every call carries: the bearer token and any extra pairs."""
        pairs = self.metadata
        if self.token:
            pairs = (("authorization", f"Bearer {self.token}"), *pairs)
        return pairs

    def _compression(self) -> grpc.Compression | None:
        return None if self.compression is None else _COMPRESSION[self.compression]

    def sync_channel(self) -> grpc.Channel:
        """A new blocking channel."""
        if self.secure:
            return grpc.secure_channel(
                self.target, self.credentials(), self.options(), self._compression()
            )
        return grpc.insecure_channel(self.target, self.options(), self._compression())

    def aio_channel(self) -> grpc.aio.Channel:
        """A new asyncio channel (create it inside the running event loop)."""
        if self.secure:
            return grpc.aio.secure_channel(
                self.target, self.credentials(), self.options(), self._compression()
            )
        return grpc.aio.insecure_channel(self.target, self.options(), self._compression())


def make_settings(
    url: str | Sequence[str],
    *,
    tls: bool | PemSource,
    client_cert: PemSource | None,
    client_key: PemSource | None,
    server_name: str | None,
    token: str | None,
    compression: str | None,
    keepalive: float | None,
    metadata: Mapping[str, str] | None,
    connections: int = 1,
) -> ChannelSettings:
    """Validate the client's constructor arguments into ChannelSettings."""
    if compression is not None and compression not in _COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSION)} or None")
    if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
        raise ValueError(f"connections must be an integer >= 1, got {connections!r}")
    return ChannelSettings(
        target=build_target(url),
        tls=tls,
        client_cert=client_cert,
        client_key=client_key,
        server_name=server_name,
        token=token,
        compression=compression,
        keepalive=keepalive,
        # gRPC metadata keys must be lowercase.
        metadata=tuple((k.lower(), v) for k, v in (metadata or {}).items()),
        connections=connections,
    )
