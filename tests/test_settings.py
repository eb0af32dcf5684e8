"""Server settings: one declaration per setting makes its flag, its LOCKGATE_* variable
and its help; bad values and ports in use stop the server with one clear line."""

from __future__ import annotations

import argparse
import dataclasses
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT

from lockgate.cli import build_parser, config_from_args
from lockgate.config import ServerConfig
from lockgate.settings import SettingError, declared, env_of, flag_of

#: A value each kind of setting refuses, by the setting's parser.
BAD = {
    "port": "70000",
    "boolean": "maybe",
    "choice": "nonsense",
    "number": "-3",
}


def config(*argv: str) -> ServerConfig:
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve: argparse.ArgumentParser = subparsers.choices["serve"]
    return serve


def bad_value(field: dataclasses.Field[object]) -> str | None:
    spec = field.metadata["setting"]
    if spec.boolean:
        return BAD["boolean"]
    if spec.choices:
        return BAD["choice"]
    if spec.repeatable or field.type in ("str", "str | None"):
        return None  # any text is a name or a path
    if field.name.endswith("_port"):
        return BAD["port"]
    return BAD["number"]


def test_every_setting_has_a_flag_and_a_variable() -> None:
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    assert {f.name for f, _ in declared(ServerConfig)} == names
    for field, spec in declared(ServerConfig):
        assert env_of(field, spec) == "LOCKGATE_" + flag_of(field, spec)[2:].upper().replace(
            "-", "_"
        )


def test_trace_ratio_has_a_flag() -> None:
    assert config("model.onnx", "--trace-ratio", "0.25").trace_ratio == 0.25
    with pytest.raises(SystemExit):
        config("model.onnx", "--trace-ratio", "2")


@pytest.mark.parametrize(
    "field",
    [f for f, _ in declared(ServerConfig) if bad_value(f) is not None],
    ids=lambda f: str(f.name),
)
def test_every_environment_value_is_checked_like_its_flag(
    field: dataclasses.Field[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = field.metadata["setting"]
    name, value = env_of(field, spec), bad_value(field)
    assert value is not None
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingError) as info:
        config("model.onnx")
    assert str(info.value).startswith(f"{name}={value!r} is not allowed: ")
    monkeypatch.delenv(name)
    if not spec.boolean:
        with pytest.raises(SystemExit):  # argparse refuses the flag the same way
            config("model.onnx", flag_of(field, spec), value)


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKGATE_GRPC_PORT", "9001")
    monkeypatch.setenv("LOCKGATE_MODEL_CONTROL_MODE", "poll")
    monkeypatch.setenv("LOCKGATE_MODEL_REPOSITORY", "from-env,also-env")
    monkeypatch.setenv("LOCKGATE_METRICS", "off")
    monkeypatch.setenv("LOCKGATE_LOG_LEVEL", "WARNING")
    from_env = config()
    assert from_env.grpc_port == 9001
    assert from_env.model_control_mode == "poll"
    assert from_env.model_repository == ["from-env", "also-env"]
    assert from_env.metrics is False
    assert from_env.log_level == "warning"
    flagged = config("--grpc-port", "9100", "--model-repository", "repo", "--metrics")
    assert flagged.grpc_port == 9100
    assert flagged.model_repository == ["repo"]  # replaces, does not add to, the env's
    assert flagged.metrics is True


def test_help_shows_every_default_and_variable() -> None:
    for action in serve_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help is not None and "(default: " in action.help, action.option_strings
    text = serve_parser().format_help()
    for field, spec in declared(ServerConfig):
        assert env_of(field, spec) in text.replace("\n", " ").replace("  ", " ")
    assert "--grpc-port PORT" in text and "(default: 8001; env" in text


def test_make_help_lists_every_task() -> None:
    text = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    for task in ("install", "run", "test", "lint", "typecheck", "check-protos", "clean"):
        assert f"make {task} " in text, task


# --- the server process: one line, no traceback ------------------------------------------


def serve(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lockgate", "serve", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "ERROR" in line or "lockgate serve:" in line]
    assert len(lines) == 1, output
    return lines[0]


def test_bad_environment_stops_the_server(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "LOCKGATE_LOG_LEVEL": "verbose"}
    line = one_error_line(serve(str(tmp_path / "model.onnx"), env=env))
    assert "LOCKGATE_LOG_LEVEL='verbose'" in line
    assert "debug, info, warning, error, critical" in line


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("flag", ["--grpc-port", "--metrics-port"])
def test_a_port_in_use_is_named_with_its_flag(
    flag: str, taken_port: int, model_repository: Path
) -> None:
    other = "--metrics-port" if flag == "--grpc-port" else "--grpc-port"
    result = serve("--model-repository", str(model_repository), flag, str(taken_port), other, "0")
    line = one_error_line(result)
    assert f"port {taken_port}" in line and "already in use" in line
    assert f"choose another with {flag}" in line


def test_a_stream_has_room_for_one_request_at_least() -> None:
    """0 would leave every stream unread for ever: refused like any bad value."""
    assert config("model.onnx", "--max-stream-requests", "1").max_stream_requests == 1
    with pytest.raises(SystemExit):
        config("model.onnx", "--max-stream-requests", "0")
