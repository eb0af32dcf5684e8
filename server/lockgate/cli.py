"""``lockgate serve|infer|models|stats|bench``: argument parsing only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from lockgate import __version__
from lockgate.cache import parse_cache_config
from lockgate.config import (
    DEFAULT_GRPC_PORT,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_METRICS_PORT,
    MAX_MESSAGE_BYTES,
    ServerConfig,
    env_default,
    parse_buckets,
)
from lockgate.logs import configure_logging
from lockgate.stats import BATCH_BUCKETS, DURATION_BUCKETS

log = logging.getLogger("lockgate")


def _env(flag: str, default: Any) -> Any:
    """Default for --FLAG: LOCKGATE_FLAG from the environment, else ``default``."""
    value = env_default(flag)
    if value is None:
        return default
    if isinstance(default, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, list):
        return [v for v in value.replace(",", " ").split() if v]
    return value


def add_serve_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description=(
            "Serve ONNX models over the KServe v2 / Triton gRPC protocol. Every flag can "
            "also be set by an environment variable LOCKGATE_<FLAG>, e.g. LOCKGATE_GRPC_PORT."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument(
        "model",
        nargs="*",
        metavar="MODEL.onnx",
        help="serve these .onnx files directly, each as version 1 of a model named after it",
    )
    where = serve.add_argument_group("models")
    where.add_argument(
        "--model-repository",
        action="append",
        default=None,
        metavar="DIR",
        help="Triton-layout repository: DIR/<model>/config.pbtxt, DIR/<model>/<version>/"
        "model.onnx (repeatable)",
    )
    where.add_argument(
        "--model-control-mode",
        choices=["none", "explicit", "poll"],
        default=_env("model-control-mode", "none"),
        help="none: load everything at start; explicit: load/unload over gRPC; "
        "poll: reload when the repository changes",
    )
    where.add_argument(
        "--load-model",
        action="append",
        dest="load_models",
        default=None,
        metavar="NAME",
        help="explicit mode: models to load at start ('*' for all)",
    )
    where.add_argument(
        "--repository-poll-secs", type=float, default=_env("repository-poll-secs", 15.0)
    )
    where.add_argument(
        "--default-max-batch-size",
        type=int,
        default=_env("default-max-batch-size", 4),
        help="max_batch_size given to batchable models whose config does not set one",
    )
    cache = where.add_mutually_exclusive_group()
    cache.add_argument(
        "--response-cache-bytes",
        "--response-cache-byte-size",  # Triton's older name for the same flag
        type=_non_negative,
        default=_env("response-cache-bytes", 0),
        metavar="N",
        help="response cache size in bytes, for models with response_cache { enable: true }; "
        "0: no cache",
    )
    cache.add_argument(
        "--cache-config",
        type=_cache_config,
        dest="cache_config_bytes",
        default=None,
        metavar="local,size=N",
        help="Triton's form of --response-cache-bytes",
    )
    net = serve.add_argument_group("network")
    net.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to listen on")
    net.add_argument("--grpc-port", type=int, default=_env("grpc-port", DEFAULT_GRPC_PORT))
    net.add_argument("--metrics-port", type=int, default=_env("metrics-port", DEFAULT_METRICS_PORT))
    net.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=_env("metrics", True),
        help="serve Prometheus metrics on --metrics-port at /metrics",
    )
    net.add_argument(
        "--max-message-bytes",
        type=int,
        default=_env("max-message-bytes", DEFAULT_MAX_MESSAGE_BYTES),
        help=f"largest request or response message (gRPC's ceiling: {MAX_MESSAGE_BYTES})",
    )
    net.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=_env("max-concurrent-streams", ServerConfig.max_concurrent_streams),
        help="concurrent RPCs one client connection may have open",
    )
    net.add_argument(
        "--max-tensor-elements",
        type=int,
        default=_env("max-tensor-elements", ServerConfig.max_tensor_elements),
        help="most elements one input tensor may declare",
    )
    net.add_argument(
        "--max-bytes-element",
        type=int,
        default=_env("max-bytes-element", ServerConfig.max_bytes_element),
        help="longest BYTES element (in bytes) an input may hold",
    )
    net.add_argument(
        "--max-bytes-tensor-elements",
        type=int,
        default=_env("max-bytes-tensor-elements", ServerConfig.max_bytes_tensor_elements),
        help="most elements one BYTES input may hold (each costs a Python object)",
    )
    net.add_argument(
        "--max-stream-requests",
        type=int,
        default=_env("max-stream-requests", ServerConfig.max_stream_requests),
        help="requests one ModelStreamInfer stream may have running or answered but unread; "
        "past it the stream is not read (backpressure)",
    )
    net.add_argument(
        "--max-health-watches",
        type=int,
        default=_env("max-health-watches", ServerConfig.max_health_watches),
        help="concurrent grpc.health.v1 Watch streams (open to callers without a token)",
    )
    net.add_argument(
        "--shared-memory",
        choices=["system", "off"],
        default=_env("shared-memory", "system"),
        help="system: clients on this host may pass tensors in POSIX shared memory "
        "regions they register (Triton's system shared-memory extension); off: refuse",
    )
    net.add_argument(
        "--grpc-max-connection-age",
        type=float,
        default=_env("grpc-max-connection-age", None),
        metavar="SECONDS",
        help="close client connections after this long so load rebalances to new replicas",
    )
    net.add_argument(
        "--grpc-keepalive-time",
        type=float,
        default=_env("grpc-keepalive-time", None),
        metavar="SECONDS",
    )
    life = serve.add_argument_group("lifecycle")
    life.add_argument(
        "--drain-seconds",
        type=float,
        default=_env("drain-seconds", 30.0),
        help="on SIGTERM, time allowed to finish accepted requests before exit",
    )
    life.add_argument(
        "--strict-readiness",
        action=argparse.BooleanOptionalAction,
        default=_env("strict-readiness", True),
        help="ready only when every model is ready (else: once startup loading is done)",
    )
    sec = serve.add_argument_group("security")
    sec.add_argument("--tls-cert", default=_env("tls-cert", None), metavar="FILE")
    sec.add_argument("--tls-key", default=_env("tls-key", None), metavar="FILE")
    sec.add_argument(
        "--tls-client-ca",
        default=_env("tls-client-ca", None),
        metavar="FILE",
        help="require client certificates signed by this CA (mTLS)",
    )
    sec.add_argument(
        "--auth-token-file",
        default=_env("auth-token-file", None),
        metavar="FILE",
        help="bearer tokens, one per line: TOKEN [infer|shm|control] (comma-separated scopes)",
    )
    obs = serve.add_argument_group("observability")
    obs.add_argument(
        "--log-level",
        type=str.lower,
        choices=["debug", "info", "warning", "error", "critical"],
        default=_env("log-level", "info"),
        help="info logs model loads/unloads and each failed request; successes never",
    )
    obs.add_argument("--log-format", choices=["text", "json"], default=_env("log-format", "text"))
    obs.add_argument(
        "--trace",
        action=argparse.BooleanOptionalAction,
        default=_env("trace", False),
        help="OpenTelemetry tracing (exporter and sampling from OTEL_* variables)",
    )
    obs.add_argument(
        "--duration-buckets",
        type=_buckets,
        default=_env("duration-buckets", _join(DURATION_BUCKETS)),
        metavar="S,S,...",
        help="bounds in seconds of the request/queue/compute duration histograms",
    )
    obs.add_argument(
        "--batch-size-buckets",
        type=_buckets,
        default=_env("batch-size-buckets", _join(BATCH_BUCKETS)),
        metavar="N,N,...",
        help="bounds in rows of the batch size histogram",
    )
    serve.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    # Flags replace LOCKGATE_MODEL_REPOSITORY rather than add to it.
    flagged = args.model_repository or _env("model-repository", [])
    repositories = list(flagged) + list(args.model)
    if not repositories:
        raise SystemExit("lockgate serve: give --model-repository DIR or a MODEL.onnx path")
    return ServerConfig(
        model_repository=repositories,
        host=args.host,
        grpc_port=int(args.grpc_port),
        metrics_port=int(args.metrics_port),
        metrics=bool(args.metrics),
        model_control_mode=args.model_control_mode,
        load_models=list(args.load_models or _env("load-model", [])),
        repository_poll_secs=float(args.repository_poll_secs),
        default_max_batch_size=int(args.default_max_batch_size),
        strict_readiness=bool(args.strict_readiness),
        drain_seconds=float(args.drain_seconds),
        grpc_max_connection_age=_float_or_none(args.grpc_max_connection_age),
        grpc_keepalive_time=_float_or_none(args.grpc_keepalive_time),
        max_message_bytes=int(args.max_message_bytes),
        max_concurrent_streams=int(args.max_concurrent_streams),
        max_tensor_elements=int(args.max_tensor_elements),
        max_bytes_element=int(args.max_bytes_element),
        max_bytes_tensor_elements=int(args.max_bytes_tensor_elements),
        max_stream_requests=int(args.max_stream_requests),
        max_health_watches=int(args.max_health_watches),
        shared_memory=args.shared_memory,
        log_format=args.log_format,
        log_level=args.log_level,
        trace=bool(args.trace),
        duration_buckets=tuple(args.duration_buckets),
        batch_size_buckets=tuple(args.batch_size_buckets),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
        response_cache_bytes=int(
            args.response_cache_bytes
            if args.cache_config_bytes is None
            else args.cache_config_bytes
        ),
    )


def _join(bounds: tuple[float, ...]) -> str:
    return ",".join(f"{b:g}" for b in bounds)


def _buckets(text: str) -> tuple[float, ...]:
    try:
        return parse_buckets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _cache_config(text: str) -> int:
    try:
        return parse_cache_config(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _float_or_none(value: Any) -> float | None:
    return None if value in (None, "", "0") else float(value)


def run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    configure_logging(config.log_level, config.log_format)
    from lockgate.allocator import tune_malloc

    tune_malloc()  # before the server's threads exist
    from lockgate.repository import DuplicateModelError
    from lockgate.security import SecurityConfigError
    from lockgate.server import LockgateServer

    async def main() -> None:
        server = LockgateServer(config)
        try:
            await server.start()
        except BaseException:
            await server.abort()
            raise
        await server.serve()

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    except (OSError, SecurityConfigError) as exc:
        log.error("%s", exc)
        return 1
    except DuplicateModelError as exc:
        log.error("%s", exc.message)
        return 1
    return 0


def _loop_factory() -> Any:
    """uvloop where it installs: measured fastest for grpc.aio under concurrency."""
    try:
        import uvloop
    except ImportError:  # Windows: the default loop works too
        return None
    return uvloop.new_event_loop


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lockgate",
        description="Lockgate: a Triton-compatible gRPC model server for ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"lockgate {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_command(subparsers)
    try:
        from lockgate.commands import add_client_commands
    except ImportError:  # the client commands are optional during development
        pass
    else:
        add_client_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
