"""Lockgate: a Triton-compatible gRPC model server for ONNX models."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _grpc_verbosity() -> str:
    """GRPC_VERBOSITY for our --log-level (or LOCKGATE_LOG_LEVEL): gRPC core follows ours.

    gRPC core logs each failed TLS handshake (a plaintext probe, a scanner) at
    INFO, one line each; those show only at our debug level. gRPC reads the
    variable once, when it is first imported, before any flag is parsed: so
    the level is looked up here, the first thing any ``lockgate`` import runs.
    """
    level = _os.environ.get("LOCKGATE_LOG_LEVEL", "info")
    args = _sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--log-level" and i + 1 < len(args):
            level = args[i + 1]
        elif arg.startswith("--log-level="):
            level = arg.partition("=")[2]
    return "INFO" if level.strip().lower() == "debug" else "ERROR"


def _import_grpc_quietly() -> None:
    """Import gRPC with our verbosity; an explicit GRPC_VERBOSITY wins.

    The variable is removed again afterwards, so that processes we start
    (tests start servers) choose their own.
    """
    if "GRPC_VERBOSITY" in _os.environ or "grpc" in _sys.modules:
        return
    _os.environ["GRPC_VERBOSITY"] = _grpc_verbosity()
    try:
        import grpc  # noqa: F401
    finally:
        del _os.environ["GRPC_VERBOSITY"]


_import_grpc_quietly()
