"""Shared fixtures: real Lockgate servers on free loopback ports, and clients of them.

Servers run as subprocesses (``python -m lockgate serve``), exactly as a user
starts them; tests talk to them over gRPC with tritonclient and our SDK. The
plain helpers (request builders, raw RPCs, metrics, certificates) are in
support.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as tc
from support import ServerProcess, launch_server, make_certificates

from models.build import build_repository


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models plus the test models, built once per session."""
    repo = tmp_path_factory.mktemp("repository")
    build_repository(repo, with_test_models=True)
    return repo


@pytest.fixture(scope="session")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One shared server over the full test repository (control mode none).

    A test module may override ``server``; ``client`` then talks to its server.
    """
    proc = launch_server(model_repository, tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[tc.InferenceServerClient]:
    """A tritonclient (sync) connected to ``server``."""
    with tc.InferenceServerClient(server.url) as triton:
        yield triton


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory for servers private to one test; all are stopped afterwards."""
    started: list[ServerProcess] = []

    def start(repository: Path | str, *extra: str, **kwargs: object) -> ServerProcess:
        proc = launch_server(repository, tmp_path, *extra, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(10)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of test certificates (see support.make_certificates)."""
    return make_certificates(tmp_path_factory.mktemp("certs"))
