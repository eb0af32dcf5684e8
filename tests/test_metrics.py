"""/metrics: Triton's names, exact values after known traffic, our histograms.

Every test reads a private server (its counters start at zero) and touches
its own model, so the tests do not depend on their order. Requests are sent
one at a time where the number of executions is asserted: each is then its
own batch.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import sys
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support import ROOT, ServerProcess, launch_server, scrape, simple_inputs
from tritonclient.utils import InferenceServerException

from lockgate.errors import FAILURE_REASONS
from lockgate.metrics import METRICS_MAX_CONNECTIONS
from models.build import build_slow

#: Every test here runs against a single-process server and one with two front ends.
pytestmark = pytest.mark.frontends(1, 2)

DURATION_BUCKETS = "0.0005,0.005,0.05,0.5,5"
BATCH_BUCKETS = "1,2,4,8"
HISTOGRAMS = (
    "lockgate_request_duration_seconds",
    "lockgate_queue_duration_seconds",
    "lockgate_compute_duration_seconds",
)
TRITON_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


@pytest.fixture(scope="module")
def metrics_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory, frontends: int
) -> Iterator[ServerProcess]:
    proc = launch_server(
        model_repository,
        tmp_path_factory.mktemp("metrics"),
        "--duration-buckets",
        DURATION_BUCKETS,
        "--batch-size-buckets",
        BATCH_BUCKETS,
        frontends=frontends,
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(metrics_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(metrics_server.url) as triton:
        yield triton


# --- helpers ---------------------------------------------------------------------


def samples(text: str) -> list[Sample]:
    """All samples; parsing the whole exposition also proves it is valid."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample ``name`` (the parser's name: counters end in _total) with ``labels``."""
    found = [s.value for s in samples(text) if s.name == name and s.labels == labels]
    assert len(found) <= 1, f"{name}{labels} appears {len(found)} times"
    return found[0] if found else None


def counter(text: str, name: str, model: str, **labels: str) -> float | None:
    return value(text, name + "_total", model=model, version="1", **labels)


def buckets(text: str, name: str, model: str) -> list[tuple[str, float]]:
    return [
        (s.labels["le"], s.value)
        for s in samples(text)
        if s.name == name + "_bucket" and s.labels.get("model") == model
    ]


def slow_inputs() -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1, 256], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 256), np.float32))
    return [tensor]


# --- exact values ------------------------------------------------------------------


def test_counters_after_sequential_requests(
    metrics_server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    """N requests of R rows, one at a time: N requests, N×R inferences, N executions."""
    before = scrape(metrics_server)
    assert counter(before, "nv_inference_request_success", "simple") == 0
    assert counter(before, "nv_inference_count", "simple") == 0
    assert counter(before, "nv_inference_exec_count", "simple") == 0
    n, rows = 5, 3
    for _ in range(n):
        client.infer("simple", simple_inputs(rows=rows))
    text = scrape(metrics_server)
    assert counter(text, "nv_inference_request_success", "simple") == n
    assert counter(text, "nv_inference_count", "simple") == n * rows
    assert counter(text, "nv_inference_exec_count", "simple") == n
    # Every failure reason is there from the start, at zero: rate() over a
    # series that appears only at the first failure shows no data.
    failures = {
        s.labels["reason"]: s.value
        for s in samples(text)
        if s.name == "nv_inference_request_failure_total" and s.labels["model"] == "simple"
    }
    assert failures == dict.fromkeys(FAILURE_REASONS, 0)
    for name in TRITON_COUNTERS[4:]:
        total = counter(text, name, "simple")
        assert total is not None and total >= 0, name
    assert (counter(text, "nv_inference_request_duration_us", "simple") or 0) > 0
    assert value(text, "nv_inference_pending_request_count", model="simple", version="1") == 0
    assert (value(text, "nv_model_load_duration_secs", model="simple", version="1") or 0) > 0
    assert value(text, "lockgate_model_ready", model="simple", version="1", state="READY") == 1


def test_histograms_count_every_request_and_execution(
    metrics_server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    """_count is N (or E), buckets are cumulative, +Inf equals _count, flags set the bounds."""
    n, rows = 4, 2
    for _ in range(n):
        client.infer("simple_string", _string_inputs(rows))
    text = scrape(metrics_server)
    labels = {"model": "simple_string", "version": "1"}
    expected_bounds = [repr(float(b)) for b in DURATION_BUCKETS.split(",")] + ["+Inf"]
    for name in HISTOGRAMS:
        counts = buckets(text, name, "simple_string")
        assert [le for le, _ in counts] == expected_bounds, name
        cumulative = [c for _, c in counts]
        assert cumulative == sorted(cumulative), f"{name} buckets are not cumulative"
        assert cumulative[-1] == n
        assert value(text, name + "_count", **labels) == n
        assert (value(text, name + "_sum", **labels) or 0) >= 0
    batch = buckets(text, "lockgate_batch_size", "simple_string")
    assert batch == [("1.0", 0), ("2.0", n), ("4.0", n), ("8.0", n), ("+Inf", n)]
    assert value(text, "lockgate_batch_size_count", **labels) == n
    assert value(text, "lockgate_batch_size_sum", **labels) == n * rows


def _string_inputs(rows: int) -> list[grpcclient.InferInput]:
    data = np.array([[str(i) for i in range(16)]] * rows, dtype=np.object_)
    inputs = [grpcclient.InferInput(f"INPUT{i}", [rows, 16], "BYTES") for i in range(2)]
    for tensor in inputs:
        tensor.set_data_from_numpy(data)
    return inputs


def test_failures_counted_by_reason(
    metrics_server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    """A bad datatype fails as INVALID_ARGUMENT; an unknown model has no model label."""
    wrong = grpcclient.InferInput("INPUT0", [2, 3], "INT32")
    wrong.set_data_from_numpy(np.zeros((2, 3), np.int32))
    for _ in range(2):
        with pytest.raises(InferenceServerException, match=r"INT32|FP32|datatype"):
            client.infer("nobatch", [wrong])
    with pytest.raises(InferenceServerException):
        client.infer("no_such_model", [wrong])
    text = scrape(metrics_server)
    assert counter(text, "nv_inference_request_failure", "nobatch", reason="INVALID_ARGUMENT") == 2
    assert counter(text, "nv_inference_request_success", "nobatch") == 0
    assert counter(text, "nv_inference_count", "nobatch") == 0
    assert counter(text, "nv_inference_exec_count", "nobatch") == 0
    # Requests for a model that does not exist are counted nowhere: there is
    # no model (and version) to label them with, as in Triton.
    assert "no_such_model" not in text


def test_every_known_version_reports_readiness(
    model_repository: Path, metrics_server: ServerProcess, tmp_path: Path
) -> None:
    """A failed version shows 0 (so the not-ready alert can fire), a ready one 1."""
    text = scrape(metrics_server)
    ready = {
        (s.labels["model"], s.labels["version"]): (s.labels["state"], s.value)
        for s in samples(text)
        if s.name == "lockgate_model_ready"
    }
    assert ready[("simple", "1")] == ("READY", 1)
    assert ready[("broken", "1")] == ("UNAVAILABLE", 0)
    # Statistics exist only for versions that loaded.
    assert counter(text, "nv_inference_request_success", "broken") is None

    # A model whose config cannot be read has no known version: version "".
    repo = tmp_path / "repo"
    (repo / "garbled" / "1").mkdir(parents=True)
    (repo / "garbled" / "config.pbtxt").write_text("this is { not a config")
    shutil.copytree(model_repository / "simple", repo / "simple")
    server = launch_server(repo, tmp_path)
    try:
        text = scrape(server)
    finally:
        server.stop()
    garbled = {"model": "garbled", "version": "", "state": "UNAVAILABLE"}
    assert value(text, "lockgate_model_ready", **garbled) == 0
    assert value(text, "lockgate_model_ready", model="simple", version="1", state="READY") == 1


def test_a_loading_version_reports_not_ready(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """While ``slow`` warms up it is there, at 0 with state LOADING; then 1, READY."""
    warmup = """
model_warmup [ { name: "hold" batch_size: 1 count: 40
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 256 ] zero_data: true } } } ]
"""
    build_slow(tmp_path, config_extra=warmup)
    server = start_server(tmp_path, "--model-control-mode", "explicit")
    seen: set[tuple[str, str, float]] = set()
    with (
        grpcclient.InferenceServerClient(server.url) as triton,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        loading = pool.submit(triton.load_model, "slow")
        while not loading.done():
            seen |= {
                (s.labels["version"], s.labels["state"], s.value)
                for s in samples(scrape(server))
                if s.name == "lockgate_model_ready" and s.labels["model"] == "slow"
            }
        loading.result()
    assert seen & {("", "LOADING", 0.0), ("1", "LOADING", 0.0)}, seen
    assert not [s for s in seen if s[1] == "READY" and s[2] != 1], seen
    assert value(scrape(server), "lockgate_model_ready", model="slow", version="1", state="READY")


def test_pending_count_returns_to_zero_after_a_burst(metrics_server: ServerProcess) -> None:
    """A burst on ``slow`` (~50 ms a batch) queues requests; all leave the queue."""
    burst = 24
    seen_pending = 0.0
    with (
        grpcclient.InferenceServerClient(metrics_server.url) as triton,
        concurrent.futures.ThreadPoolExecutor(burst) as pool,
    ):
        futures = [pool.submit(triton.infer, "slow", slow_inputs()) for _ in range(burst)]
        # At ~50 ms a batch and at most 8 rows a batch, a burst of 24 keeps
        # requests queued for over 100 ms: a scrape in that window sees them.
        while not all(f.done() for f in futures):
            text = scrape(metrics_server)
            pending = value(text, "nv_inference_pending_request_count", model="slow", version="1")
            seen_pending = max(seen_pending, pending or 0)
        for future in futures:
            future.result()
    text = scrape(metrics_server)
    assert seen_pending > 0
    assert value(text, "nv_inference_pending_request_count", model="slow", version="1") == 0
    assert counter(text, "nv_inference_request_success", "slow") == burst
    assert counter(text, "nv_inference_count", "slow") == burst
    executions = counter(text, "nv_inference_exec_count", "slow") or 0
    assert burst / 8 <= executions <= burst
    labels = {"model": "slow", "version": "1"}
    assert value(text, "lockgate_batch_size_count", **labels) == executions
    assert value(text, "lockgate_batch_size_sum", **labels) == burst


# --- exposition ------------------------------------------------------------------


def test_exposition_uses_tritons_names(
    metrics_server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    """Counters under Triton's exact names (no _total), and a valid exposition."""
    client.infer("simple", simple_inputs())
    text = scrape(metrics_server)
    lines = text.splitlines()
    for name in TRITON_COUNTERS:
        assert f"# TYPE {name} counter" in lines, name
        assert f"{name}_total" not in text, name
    assert any(line.startswith('nv_inference_count{model="simple",version="1"} ') for line in lines)
    assert "# TYPE nv_inference_pending_request_count gauge" in lines
    assert "# TYPE lockgate_request_duration_seconds histogram" in lines
    # The standard collectors keep the standard writer's names and types.
    assert "# TYPE process_cpu_seconds_total counter" in lines
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["nv_inference_count"] == "counter"
    assert families["lockgate_batch_size"] == "histogram"
    assert families["process_cpu_seconds"] == "counter"
    assert families["python_gc_objects_collected"] == "counter"
    # Every Lockgate family is one deploy/ (dashboards, alerts) knows about.
    listed = ROOT / "deploy" / "metrics.txt"
    if listed.is_file():
        known = set(listed.read_text().split())
        ours = {n for n in families if n.startswith(("nv_", "lockgate_"))}
        assert ours <= known, ours - known


def test_no_gpu_metrics_without_nvml(metrics_server: ServerProcess) -> None:
    from lockgate.gpu import open_gpus

    gpus = open_gpus()
    if gpus is not None:
        gpus.close()
        pytest.skip("this machine has a GPU that NVML can read")
    assert "nv_gpu_" not in scrape(metrics_server)


def test_no_metrics_flag_serves_nothing(model_repository: Path, tmp_path: Path) -> None:
    proc = launch_server(model_repository, tmp_path, "--no-metrics")
    try:
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(proc.metrics_url, timeout=5)
    finally:
        proc.stop()


def test_bad_bucket_flag_is_refused(model_repository: Path, tmp_path: Path) -> None:
    proc = launch_server(model_repository, tmp_path, "--duration-buckets", "0.1,0.01", wait=False)
    assert proc.process.wait(30) == 2  # argparse's usage error
    assert "strictly increasing" in proc.log()


# --- pure pieces -------------------------------------------------------------------


def test_parse_buckets() -> None:
    from lockgate.config import parse_buckets

    assert parse_buckets("0.001, 0.01,1") == (0.001, 0.01, 1.0)
    for bad in ("", "1,1", "2,1", "-1,1", "inf", "a,b"):
        with pytest.raises(ValueError):
            parse_buckets(bad)


class FakeNvml(types.ModuleType):
    """Just enough of pynvml: two GPUs, the second without power readings."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> Any:
        return f"GPU-{handle}" if handle else b"GPU-0"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return types.SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return types.SimpleNamespace(used=1 << 30, total=80 << 30, free=79 << 30)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if handle:
            raise self.NVMLError("Not Supported")
        return 123_456

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return 5_000_000


def test_gpu_readings_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry

    from lockgate.gpu import open_gpus
    from lockgate.metrics import GpuCollector, exposition

    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus = open_gpus()
    assert gpus is not None
    first, second = gpus.read()
    assert first.uuid == "GPU-0" and second.uuid == "GPU-1"
    assert first.utilization == pytest.approx(0.37)
    assert (first.memory_used_bytes, first.memory_total_bytes) == (1 << 30, 80 << 30)
    assert first.power_usage == pytest.approx(123.456)
    assert first.power_limit == pytest.approx(700.0)
    assert first.energy_consumption == pytest.approx(5000.0)
    assert second.power_usage is None  # NOT_SUPPORTED leaves out one reading only
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuCollector(gpus))
    text = exposition(registry).decode()
    assert value(text, "nv_gpu_utilization", gpu_uuid="GPU-1") == pytest.approx(0.37)
    assert value(text, "nv_gpu_memory_total_bytes", gpu_uuid="GPU-0") == 80 << 30
    assert value(text, "nv_gpu_power_usage", gpu_uuid="GPU-0") == pytest.approx(123.456)
    assert value(text, "nv_gpu_power_usage", gpu_uuid="GPU-1") is None
    gpus.close()
    assert fake.shutdowns == 1


def test_no_nvml_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from lockgate.gpu import open_gpus

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert open_gpus() is None

    class NoDriver(FakeNvml):
        def nvmlInit(self) -> None:
            raise self.NVMLError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", NoDriver())
    assert open_gpus() is None


def test_idle_metrics_connections_are_bounded(metrics_server: ServerProcess) -> None:
    """Idle connections get no thread past the cap, and are closed after the timeout."""
    extra = 8
    sockets = [
        socket.create_connection(("127.0.0.1", metrics_server.metrics_port), timeout=60)
        for _ in range(METRICS_MAX_CONNECTIONS + extra)
    ]
    try:
        # Each idle connection is closed by the server: the ones over the cap
        # at once, the others when the idle timeout passes (recv then sees EOF).
        closed = [s.recv(1) for s in sockets]
        assert closed == [b""] * len(sockets)
        assert "nv_inference_count" in scrape(metrics_server)  # still scraped
    finally:
        for s in sockets:
            s.close()
