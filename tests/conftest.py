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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "frontends(*counts): run the tests once per `lockgate serve --frontends` count "
        "(the fixtures' servers take it from the `frontends` fixture)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.frontends(1, 2)`` (or a module's ``pytestmark``) runs a test per count."""
    marker = metafunc.definition.get_closest_marker("frontends")
    if marker is None or "frontends" not in metafunc.fixturenames:
        return
    counts = [int(n) for n in marker.args]
    metafunc.parametrize(
        "frontends", counts, indirect=True, scope="session", ids=[f"fe{n}" for n in counts]
    )


@pytest.fixture(scope="session")
def frontends(request: pytest.FixtureRequest) -> int:
    """``--frontends`` of the servers the fixtures start: 1 unless a marker asks for more."""
    return int(getattr(request, "param", 1))


@pytest.fixture(scope="session")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory, frontends: int
) -> Iterator[ServerProcess]:
    """One shared server over the full test repository (control mode none).

    A test module may override ``server``; ``client`` then talks to its server.
    """
    proc = launch_server(model_repository, tmp_path_factory.mktemp("logs"), frontends=frontends)
    yield proc
    proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[tc.InferenceServerClient]:
    """A tritonclient (sync) connected to ``server``."""
    with tc.InferenceServerClient(server.url) as triton:
        yield triton


@pytest.fixture
def start_server(tmp_path: Path, frontends: int) -> Iterator[Callable[..., ServerProcess]]:
    """Factory for servers private to one test; all are stopped afterwards."""
    started: list[ServerProcess] = []

    def start(repository: Path | str, *extra: str, **kwargs: object) -> ServerProcess:
        kwargs.setdefault("frontends", frontends)
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
