"""The README's short tour, run as written against a live server.

Only the addresses change (the test's server listens on free ports, not
8001/8002; the CLI reads LOCKGATE_URL) and the benchmark runs for 0.5 s instead of 10: every other
character of the commands is the README's, so a tour that breaks for a new
user breaks here first.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, launch_server

from models.build import build_repository


def tour() -> list[tuple[str, str]]:
    """(language, code) of each block between "A short tour" and the next section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## A short tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """What `make run` serves: the example models only."""
    repo = tmp_path_factory.mktemp("examples")
    build_repository(repo)
    server = launch_server(repo, tmp_path_factory.mktemp("tour-logs"))
    yield server
    server.stop()


def localize(code: str, server: ServerProcess) -> str:
    return code.replace("127.0.0.1:8001", server.url).replace(
        "127.0.0.1:8002", f"127.0.0.1:{server.metrics_port}"
    )


def run(argv: list[str], cwd: Path, **env: str) -> str:
    # The venv's scripts (lockgate) first, as after `source .venv/bin/activate`.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    done = subprocess.run(
        argv,
        cwd=cwd,
        env={**os.environ, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_tour_python(examples: ServerProcess, tmp_path: Path) -> None:
    """The tritonclient and SDK snippets, pasted one after the other into Python."""
    code = "\n".join(localize(c, examples) for lang, c in tour() if lang == "python")
    assert "tritonclient" in code and "lockgate_client" in code
    out = run([sys.executable, "-c", code], tmp_path)
    assert out.count("[[ 1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16]]") == 2, out


def test_tour_command_line(examples: ServerProcess, tmp_path: Path) -> None:
    """The first shell block, line by line (a trailing backslash joins lines)."""
    shell = next(c for lang, c in tour() if lang == "bash")
    script = localize(shell, examples).replace("--duration 10", "--duration 0.5")
    # The CLI's documented way to name another server than 127.0.0.1:8001.
    out = run(["bash", "-e", "-o", "pipefail", "-c", script], tmp_path, LOCKGATE_URL=examples.url)
    assert "simple" in out and "READY" in out  # lockgate models
    assert "[[ 2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17]]" in out  # infer with ones.npy
    assert "CONCURRENCY" in out  # bench
    assert 'nv_inference_count{model="simple",version="1"}' in out  # metrics
