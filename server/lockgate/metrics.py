"""Prometheus metrics, read at scrape time from the models' own statistics.

Nothing here runs per request: a custom collector turns each ModelStats into
Triton's metric families (same names and labels, so existing dashboards
work) plus Lockgate's histograms, whenever /metrics is scraped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lockgate.cache import ResponseCache
from lockgate.config import ServerConfig
from lockgate.gpu import Gpus, open_gpus
from lockgate.model import ModelState, ModelVersion
from lockgate.repository import ModelRepository
from lockgate.stats import Histogram

log = logging.getLogger("lockgate.metrics")

LABELS = ["model", "version"]


class ModelCollector(Collector):
    """Every ready model version's statistics, and every known version's readiness."""

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    def collect(self) -> Iterator[Metric]:
        models = self._repository.ready_models()

        def counter(name: str, doc: str) -> TritonCounter:
            return TritonCounter(name, doc)

        success = counter("nv_inference_request_success", "Successful inference requests")
        failure = counter("nv_inference_request_failure", "Failed inference requests, by reason")
        count = counter("nv_inference_count", "Inferences performed (a batch of 8 counts 8)")
        execs = counter("nv_inference_exec_count", "Model executions (batches) performed")
        request_us = counter(
            "nv_inference_request_duration_us", "Cumulative request duration in microseconds"
        )
        queue_us = counter(
            "nv_inference_queue_duration_us", "Cumulative time requests spent queued (µs)"
        )
        input_us = counter(
            "nv_inference_compute_input_duration_us", "Cumulative compute input time (µs)"
        )
        infer_us = counter(
            "nv_inference_compute_infer_duration_us", "Cumulative compute infer time (µs)"
        )
        output_us = counter(
            "nv_inference_compute_output_duration_us", "Cumulative compute output time (µs)"
        )
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Requests waiting in the queue for an instance",
            labels=LABELS,
        )
        load = GaugeMetricFamily(
            "nv_model_load_duration_secs", "Time the model version took to load", labels=LABELS
        )
        ready = GaugeMetricFamily(
            "lockgate_model_ready",
            "1 when the model version is ready, 0 while it is loading, failed or unloading",
            labels=[*LABELS, "state"],
        )
        for name, version, state in self._repository.version_states():
            ready.add_metric([name, version, state.value], 1 if state == ModelState.READY else 0)
        # Triton's per-model cache families, for models whose cache is on.
        cache_hits = counter("nv_cache_num_hits_per_model", "Response cache hits per model")
        cache_misses = counter("nv_cache_num_misses_per_model", "Response cache misses per model")
        cache_hit_us = counter(
            "nv_cache_hit_duration_per_model",
            "Cumulative time to look up and copy out cache hits (µs)",
        )
        cache_miss_us = counter(
            "nv_cache_miss_duration_per_model",
            "Cumulative time to look up and insert cache misses (µs)",
        )
        histograms = {
            "request": _histogram("lockgate_request_duration_seconds", "Request duration"),
            "queue": _histogram("lockgate_queue_duration_seconds", "Time spent queued"),
            "compute": _histogram("lockgate_compute_duration_seconds", "Batch compute time"),
            "batch": _histogram("lockgate_batch_size", "Rows per execution"),
        }
        for model in models:
            stats = model.stats
            labels = [model.name, model.version]
            success.add_metric(labels, stats.success.count)
            for reason, n in sorted(stats.failures.items()):
                failure.add_metric(labels, n, reason=reason)
            count.add_metric(labels, stats.inference_count)
            execs.add_metric(labels, stats.execution_count)
            request_us.add_metric(labels, stats.success.ns / 1000)
            queue_us.add_metric(labels, stats.queue.ns / 1000)
            input_us.add_metric(labels, stats.compute_input.ns / 1000)
            infer_us.add_metric(labels, stats.compute_infer.ns / 1000)
            output_us.add_metric(labels, stats.compute_output.ns / 1000)
            pending.add_metric(labels, _pending(model))
            load.add_metric(labels, stats.load_seconds)
            if model.cache is not None:
                cache_hits.add_metric(labels, stats.cache_hit.count)
                cache_misses.add_metric(labels, stats.cache_miss.count)
                cache_hit_us.add_metric(labels, stats.cache_hit.ns / 1000)
                cache_miss_us.add_metric(labels, stats.cache_miss.ns / 1000)
            _observe(histograms["request"], labels, stats.request_seconds)
            _observe(histograms["queue"], labels, stats.queue_seconds)
            _observe(histograms["compute"], labels, stats.compute_seconds)
            _observe(histograms["batch"], labels, stats.batch_size)
        yield from (success, failure, count, execs, request_us, queue_us, input_us)
        yield from (infer_us, output_us, pending, load, ready, *histograms.values())
        yield from (cache_hits, cache_misses, cache_hit_us, cache_miss_us)
        yield from _cache_gauges(self._repository.cache)


def _cache_gauges(cache: ResponseCache | None) -> Iterator[Metric]:
    """The server-wide cache: its fill, entries and evictions."""
    if cache is None:
        return
    used = GaugeMetricFamily("lockgate_response_cache_bytes", "Bytes held by the response cache")
    used.add_metric([], cache.used_bytes)
    util = GaugeMetricFamily("nv_cache_util", "Fraction of the response cache in use [0.0 - 1.0]")
    util.add_metric([], cache.used_bytes / cache.capacity_bytes)
    entries = GaugeMetricFamily("nv_cache_num_entries", "Responses held by the response cache")
    entries.add_metric([], len(cache))
    evictions = GaugeMetricFamily(
        "nv_cache_num_evictions", "Responses evicted from the response cache to make room"
    )
    evictions.add_metric([], cache.evictions)
    yield from (used, util, entries, evictions)


def _pending(model: ModelVersion) -> int:
    """Queued requests whose callers still wait, read from the scrape thread.

    The scheduler's queues belong to the event loop thread; walking one while
    the loop appends to it can raise RuntimeError ("deque mutated during
    iteration"). A retry almost always succeeds; the plain queue length (which
    may still count a request whose caller has just left) is the fallback.
    """
    for _ in range(3):
        try:
            return model.scheduler.pending
        except RuntimeError:
            continue
    return model.scheduler.queued


class GpuCollector(Collector):
    """Triton's ``nv_gpu_*`` gauges, one sample per GPU (label ``gpu_uuid``)."""

    def __init__(self, gpus: Gpus) -> None:
        self._gpus = gpus

    def collect(self) -> Iterator[Metric]:
        families = {
            "utilization": ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)"),
            "memory_total_bytes": ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes"),
            "memory_used_bytes": ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes"),
            "power_usage": ("nv_gpu_power_usage", "GPU power usage in watts"),
            "power_limit": ("nv_gpu_power_limit", "GPU power management limit in watts"),
            "energy_consumption": (
                "nv_energy_consumption",
                "GPU energy consumption in joules since the driver loaded",
            ),
        }
        readings = self._gpus.read()
        for field, (name, doc) in families.items():
            family = GaugeMetricFamily(name, doc, labels=["gpu_uuid"])
            for reading in readings:
                value = getattr(reading, field)
                if value is not None:
                    family.add_metric([reading.uuid], value)
            yield family


class TritonCounter(Metric):
    """A counter exposed under Triton's exact sample name.

    prometheus_client appends ``_total`` to counter samples; Triton's
    dashboards query ``nv_inference_count`` etc. without it, so we name the
    samples ourselves.
    """

    def __init__(self, name: str, doc: str) -> None:
        super().__init__(name, doc, "counter")
        self.name = name

    def add_metric(self, labels: list[str], value: float, **extra: str) -> None:
        self.add_sample(self.name, dict(zip(LABELS, labels, strict=True), **extra), value)


def _histogram(name: str, doc: str) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=LABELS)


def _observe(family: HistogramMetricFamily, labels: list[str], hist: Histogram) -> None:
    family.add_metric(labels, hist.cumulative(), hist.sum)


def exposition(registry: CollectorRegistry) -> bytes:
    """Prometheus text format, with counters under their own names.

    prometheus_client's writer renames every counter family to ``*_total``;
    Triton's are plain (``nv_inference_count``), and dashboards query those.
    Only for the Triton families: the process and GC ones keep the standard
    writer (see ``Metrics.render``), whose ``*_total`` names they expect.
    """
    lines: list[str] = []
    for metric in registry.collect():
        lines.append(f"# HELP {metric.name} {_escape(metric.documentation)}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        for sample in metric.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
            value = floatToGoString(sample.value)  # type: ignore[no-untyped-call]
            lines.append(
                f"{sample.name}{{{labels}}} {value}" if labels else f"{sample.name} {value}"
            )
    return ("\n".join(lines) + "\n").encode()


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Everything /metrics shows: Triton's families, then the standard ones."""

    def __init__(self, repository: ModelRepository) -> None:
        self.triton = CollectorRegistry(auto_describe=False)
        self.triton.register(ModelCollector(repository))
        self.gpus = open_gpus()
        if self.gpus is not None:
            self.triton.register(GpuCollector(self.gpus))
        self.standard = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.standard)
        GCCollector(registry=self.standard)

    def render(self) -> bytes:
        return exposition(self.triton) + generate_latest(self.standard)

    def close(self) -> None:
        if self.gpus is not None:
            self.gpus.close()


#: Connections the metrics port serves at once (a thread each); more are
#: closed as they arrive. Prometheus scrapes over one connection at a time.
METRICS_MAX_CONNECTIONS = 32
#: Seconds a metrics connection may take to send its request before it is closed.
METRICS_IDLE_TIMEOUT_S = 5.0


class MetricsServer(ThreadingHTTPServer):
    """The /metrics HTTP server, with bounded connections; ``shutdown`` also releases NVML."""

    daemon_threads = True
    metrics: Metrics

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # No thread for it: hundreds of idle connections must not mean hundreds of threads.
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        super().shutdown()
        self.server_close()
        self.metrics.close()


def start_metrics_server(config: ServerConfig, repository: ModelRepository) -> Any:
    """Serve /metrics on its own thread; returns the HTTP server (for shutdown)."""
    metrics = Metrics(repository)

    class Handler(BaseHTTPRequestHandler):
        # A connection that sends nothing is closed after this (socket timeout).
        timeout = METRICS_IDLE_TIMEOUT_S

        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "metrics are at /metrics")
                return
            body = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            del format, args  # scrapes are not worth a log line each

    server = MetricsServer((config.host, config.metrics_port), Handler)
    server.metrics = metrics
    threading.Thread(target=server.serve_forever, name="lockgate-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", config.host, server.server_address[1])
    return server
