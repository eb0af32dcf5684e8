"""``lockgate serve|infer|models|stats|bench``: argument parsing only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from lockgate import __version__
from lockgate.config import ServerConfig
from lockgate.logs import configure_logging
from lockgate.settings import SettingError, add_flags, resolve

log = logging.getLogger("lockgate")


def add_serve_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``lockgate serve``: one flag per ServerConfig setting (settings.py)."""
    serve = subparsers.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description=(
            "Serve ONNX models over the KServe v2 / Triton gRPC protocol. Every flag can "
            "also be set by an environment variable LOCKGATE_<FLAG>, e.g. LOCKGATE_GRPC_PORT; "
            "a flag given here wins over the environment."
        ),
    )
    serve.add_argument(
        "model",
        nargs="*",
        metavar="MODEL.onnx",
        help="serve these .onnx files directly, each as version 1 of a model named after it",
    )
    add_flags(serve, ServerConfig)
    serve.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The config from the flags, then LOCKGATE_* variables, then the defaults.

    Raises SettingError for a bad environment value.
    """
    values = resolve(ServerConfig, args)
    values["model_repository"] = list(values.get("model_repository", [])) + list(args.model)
    if not values["model_repository"]:
        raise SettingError("give --model-repository DIR or a MODEL.onnx path")
    return ServerConfig(**values)


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except SettingError as exc:
        # One line, no traceback: the operator fixes a flag or a variable.
        print(f"lockgate serve: {exc}", file=sys.stderr)
        return 2
    if config.frontends > 1:
        return _run_supervisor(config)
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


def _run_supervisor(config: ServerConfig) -> int:
    if config.grpc_port == 0:
        print("lockgate serve: --frontends above 1 needs a fixed --grpc-port", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format, role="supervisor")
    from lockgate.supervisor import Supervisor

    return Supervisor(config, config.frontends).run()


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
