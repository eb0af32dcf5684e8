"""``lockgate serve``: argument parsing only.

The ``lockgate`` script itself belongs to the client distribution
(``lockgate_client.cli``); this distribution adds ``serve`` to it through the
``lockgate.commands`` entry point group. ``python -m lockgate`` runs the
same parser.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lockgate.config import ServerConfig
from lockgate.logs import configure_logging
from lockgate.settings import SettingError, add_flags, resolve
from lockgate_client import cli as client_cli
from lockgate_client._loop import run

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
        run(main())
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


def build_parser() -> argparse.ArgumentParser:
    """The ``lockgate`` parser with ``serve`` (also without installed entry points)."""
    return client_cli.build_parser(add_serve_command)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lockgate``: the ``lockgate`` script, ``serve`` included."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
