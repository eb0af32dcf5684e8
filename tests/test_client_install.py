"""``pip install ./client`` into a fresh virtualenv, as a user would.

The SDK must stand alone: it installs from the package registry with only
grpcio, protobuf and numpy, and never pulls in the server's heavy
dependencies (ONNX Runtime above all).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str | Path, cwd: Path | None = None) -> str:
    # The test run's PYTHONPATH (client/, server/) must not leak into the venv.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=240
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_client_installs_alone(tmp_path: Path) -> None:
    # Build from a copy, so the build leaves nothing in the checkout and
    # concurrent runs do not share build directories.
    source = tmp_path / "client"
    shutil.copytree(
        ROOT / "client",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dist"),
    )
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", source)

    # Run outside the checkout so the installed package, not the source, is imported.
    code = (
        "import lockgate_client, numpy\n"
        "from lockgate_client import Client, AsyncClient, LockgateError\n"
        "from lockgate_client._proto import grpc_service_pb2\n"
        "print(lockgate_client.__version__, lockgate_client.__file__)\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run(python, "-c", code, cwd=elsewhere)
    version, location = out.split()
    assert version == "0.1.0"
    assert str(venv) in location

    installed = run(python, "-m", "pip", "list", "--format=freeze").lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert "lockgate-client" in names
    assert {"grpcio", "protobuf", "numpy"} <= names
    assert not any(name.startswith("onnxruntime") for name in names), names
    assert "lockgate" not in names
    # The type information and the licence ship with it.
    assert (Path(location).parent / "py.typed").is_file()
    licences = list(
        Path(location).parent.parent.glob("lockgate_client-*.dist-info/licenses/LICENSE")
    )
    assert len(licences) == 1 and licences[0].read_bytes() == (ROOT / "LICENSE").read_bytes()
    # The command line comes with the SDK: every client command, and no serve
    # (that is added by the server distribution when it is installed).
    usage = run(venv / "bin" / "lockgate", "--help", cwd=elsewhere)
    commands = {line.split()[0] for line in usage.splitlines() if line.startswith("    ")}
    assert commands == {"infer", "models", "stats", "bench"}, usage


def test_dev_install_shows_the_sdk_types_to_mypy(tmp_path: Path) -> None:
    """Code developed against the checkout's .venv is type-checked against the SDK.

    setuptools' default editable install hides a flat-layout package behind an
    import hook that mypy cannot follow ("Cannot find implementation");
    client/pyproject.toml states its package root, which makes it a .pth path.
    """
    user = tmp_path / "app.py"
    user.write_text(
        "from lockgate_client import Client\n"
        "def make() -> int:\n"
        '    return Client("127.0.0.1:8001")\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(user)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert "import-not-found" not in result.stdout, result.stdout
    assert 'Incompatible return value type (got "Client", expected "int")' in result.stdout
