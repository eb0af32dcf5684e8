"""Logs: one structured line per model load and per failed request, none per success."""

from __future__ import annotations

import io
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from support import simple_inputs
from tritonclient.utils import InferenceServerException

from lockgate.logs import JsonFormatter, configure_logging


def json_lines(text: str) -> list[dict[str, Any]]:
    """The log's JSON entries (native libraries may print other lines to stderr)."""
    entries = []
    for line in text.splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


def test_json_log_has_loads_and_failures(model_repository: Path, start_server: Any) -> None:
    server = start_server(model_repository, "--log-format", "json")
    with grpcclient.InferenceServerClient(server.url) as client:
        client.infer("simple", simple_inputs(), request_id="ok-1")
        with pytest.raises(InferenceServerException):
            client.infer("simple", simple_inputs(datatype="INT8"), request_id="req-42")
        with pytest.raises(InferenceServerException):
            client.infer("no_such_model", simple_inputs(), request_id="req-43")
    assert server.stop() == 0
    log = server.log()
    entries = json_lines(log)
    assert entries, log
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)

    loads = [e for e in entries if e.get("event") == "model_loaded"]
    assert {(e["model"], e["version"]) for e in loads} >= {("simple", "1"), ("slow", "1")}
    assert all(e["level"] == "info" for e in loads)

    failures = {e["request_id"]: e for e in entries if e.get("event") == "request_failed"}
    assert set(failures) == {"req-42", "req-43"}, "one line per failure, none per success"
    bad = failures["req-42"]
    assert (bad["model"], bad["reason"], bad["level"]) == ("simple", "INVALID_ARGUMENT", "info")
    assert "INT8" in bad["message"] and "req-42" in bad["message"]
    assert failures["req-43"]["reason"] == "NOT_FOUND"
    assert "ok-1" not in log


def test_text_format_is_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("warning", "text")
        logging.getLogger("lockgate.test").info("hidden below the level")
        logging.getLogger("lockgate.test").warning("shown %d", 1, extra={"request_id": "r"})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "hidden" not in err
    (line,) = err.splitlines()
    assert line.endswith("WARNING lockgate.test: shown 1")


def test_json_formatter_keeps_extra_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("lockgate.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("failed %s", "x", extra={"request_id": "req-1", "model": "m"})
    finally:
        logger.removeHandler(handler)
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "failed x"
    assert (entry["request_id"], entry["model"], entry["level"]) == ("req-1", "m", "warning")


def test_device_probe_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """Models load in parallel threads; the GPU probe's line comes once, not per model."""
    from lockgate import runner

    runner._probe_cuda.cache_clear()
    start = threading.Barrier(8)

    def load() -> int:
        start.wait()
        return runner.cuda_device_count()

    with caplog.at_level(logging.INFO, logger="lockgate.runner"), ThreadPoolExecutor(8) as pool:
        counts = set(pool.map(lambda _: load(), range(8)))
    assert len(counts) == 1
    probes = [r for r in caplog.records if r.name == "lockgate.runner"]
    assert len(probes) == 1, [r.getMessage() for r in probes]
