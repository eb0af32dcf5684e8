"""Traces: tracing.py in-process with the SDK's in-memory exporter, then a real
server exporting over OTLP/HTTP to a receiver this test runs on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support import ServerProcess, free_port

from lockgate import tracing
from lockgate.config import ServerConfig
from lockgate.errors import InvalidInputError
from lockgate.request import InferRequest
from lockgate.stats import ModelStats
from lockgate_client._proto import grpc_service_pb2 as pb

#: Every test here runs against a single-process server and one with two front ends.
pytestmark = pytest.mark.frontends(1, 2)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def traceparent(sampled: bool = True) -> str:
    return f"00-{TRACE_ID}-{PARENT_ID}-{'01' if sampled else '00'}"


# --- in-process: tracing.py alone -------------------------------------------------------


@dataclass
class Traced:
    """A tracer exporting to memory."""

    tracer: tracing.Tracer
    exporter: InMemorySpanExporter


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Iterator[Traced]:
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    memory = InMemorySpanExporter()
    tracer = tracing.setup(ServerConfig(), SimpleSpanProcessor(memory))
    assert tracer is not None
    yield Traced(tracer, memory)
    tracer.shutdown()


class FakeModel:
    """Plays Servicer._infer + the scheduler: two requests become one batch."""

    def __init__(self, tracer: tracing.Tracer, batch_size: int) -> None:
        self.tracer = tracer
        self.stats = ModelStats("simple", "1")
        self.batch_size = batch_size
        self.waiting: list[InferRequest] = []
        self.ran = asyncio.Event()

    async def infer(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        trace: tracing.RequestTrace | None,
    ) -> Any:
        if request.id == "bad":
            raise InvalidInputError("input 'INPUT0' has datatype INT8, expected INT32")
        decoded = InferRequest(inputs={}, rows=2, outputs=None, shape_key=(), request_id=request.id)
        decoded.arrival_ns = time.monotonic_ns()
        assert trace is not None
        trace.attach(decoded)
        self.waiting.append(decoded)
        if len(self.waiting) == self.batch_size:
            await asyncio.sleep(0.001)
            now = time.monotonic_ns()
            for each in self.waiting:
                each.dequeue_ns = now
            self.tracer.observe_batch(self.stats, self.waiting, None)
            self.ran.set()
        await self.ran.wait()
        return pb.ModelInferResponse(model_name="simple", model_version="1", id=request.id)


def call(model: FakeModel, request_id: str, sampled: bool = True) -> Any:
    request = pb.ModelInferRequest(model_name="simple", id=request_id)
    metadata = [("traceparent", traceparent(sampled)), ("user-agent", "test")]
    return model.tracer.traced("ModelInfer", model.infer, request, None, metadata)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_request_queue_and_execute_spans(traced: Traced) -> None:
    model = FakeModel(traced.tracer, batch_size=2)

    async def run() -> None:
        await asyncio.gather(call(model, "a"), call(model, "b"))

    asyncio.run(run())
    spans = traced.exporter.get_finished_spans()
    servers = by_name(spans, "ModelInfer")
    assert len(servers) == 2
    for span in servers:
        assert span.kind == SpanKind.SERVER
        assert span.context is not None and span.parent is not None
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert format(span.parent.span_id, "016x") == PARENT_ID
        assert span.parent.is_remote
        attributes = dict(span.attributes or {})
        assert attributes["lockgate.model"] == "simple"
        assert attributes["lockgate.model_version"] == "1"
        assert attributes["lockgate.rows"] == 2
        assert attributes["lockgate.status"] == "OK"
        assert attributes["rpc.grpc.status_code"] == 0
        assert attributes["rpc.method"] == "ModelInfer"
        assert span.status.status_code != StatusCode.ERROR
    server_ids = {s.context.span_id for s in servers if s.context is not None}
    queues = by_name(spans, "queue")
    assert len(queues) == 2
    assert {q.parent.span_id for q in queues if q.parent is not None} == server_ids
    for queue in queues:
        assert queue.start_time is not None and queue.end_time is not None
        assert queue.start_time <= queue.end_time
    (execute,) = by_name(spans, "execute")
    assert execute.parent is not None and execute.parent.span_id in server_ids
    assert {link.context.span_id for link in execute.links} == server_ids
    attributes = dict(execute.attributes or {})
    assert attributes["lockgate.batch_size"] == 4
    assert attributes["lockgate.batch_requests"] == 2
    assert attributes["lockgate.model"] == "simple"
    assert attributes["lockgate.model_version"] == "1"
    assert attributes["lockgate.status"] == "OK"


def test_failed_request_span(traced: Traced) -> None:
    model = FakeModel(traced.tracer, batch_size=1)

    async def run() -> None:
        with pytest.raises(InvalidInputError):
            await call(model, "bad")

    asyncio.run(run())
    (span,) = traced.exporter.get_finished_spans()  # decoding failed: no queue, no batch
    assert span.name == "ModelInfer"
    assert span.status.status_code == StatusCode.ERROR
    assert "INT8" in (span.status.description or "")
    attributes = dict(span.attributes or {})
    assert attributes["lockgate.status"] == "INVALID_ARGUMENT"
    assert attributes["rpc.grpc.status_code"] == 3
    assert attributes["lockgate.request_id"] == "bad"


def test_unsampled_caller_records_nothing(traced: Traced) -> None:
    model = FakeModel(traced.tracer, batch_size=1)
    asyncio.run(call(model, "quiet", sampled=False))
    assert traced.exporter.get_finished_spans() == ()


def test_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.wanted(ServerConfig())
    assert tracing.setup(ServerConfig()) is None
    assert tracing.wanted(ServerConfig(trace=True))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert tracing.wanted(ServerConfig())
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.wanted(ServerConfig(trace=True))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.wanted(ServerConfig(trace=True))


# --- end to end: a server exporting over OTLP/HTTP --------------------------------------


class Receiver(ThreadingHTTPServer):
    """A minimal OTLP/HTTP collector: keeps every span it is sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", free_port()), ReceiverHandler)
        self.spans: list[tuple[dict[str, Any], Any]] = []
        self.lock = threading.Lock()

    def spans_of(self, trace_id: str) -> list[Any]:
        with self.lock:
            return [s for _, s in self.spans if s.trace_id.hex() == trace_id]


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        with self.server.lock:
            for resource_spans in export.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.server.spans.extend((resource, s) for s in scope_spans.spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_server_exports_spans_over_otlp(
    model_repository: Path, start_server: Any, receiver: Receiver
) -> None:
    port = receiver.server_address[1]
    server: ServerProcess = start_server(
        model_repository,
        "--trace",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        },
    )
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [grpcclient.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in range(2)]
    for tensor in inputs:
        tensor.set_data_from_numpy(data)
    with grpcclient.InferenceServerClient(server.url) as client:
        client.infer(
            "simple", inputs, request_id="traced-1", headers={"traceparent": traceparent()}
        )
    wanted = {"ModelInfer", "queue", "execute"}
    deadline = time.monotonic() + 30  # a bound on waiting, not an assertion on time
    while time.monotonic() < deadline:
        spans = receiver.spans_of(TRACE_ID)
        if wanted <= {s.name for s in spans}:
            break
        time.sleep(0.05)
    spans = receiver.spans_of(TRACE_ID)
    names = {s.name: s for s in spans}
    assert wanted <= set(names), f"spans received: {sorted(names)}\n{server.log()}"
    infer, queue, execute = names["ModelInfer"], names["queue"], names["execute"]
    assert infer.parent_span_id.hex() == PARENT_ID
    assert infer.kind == infer.SPAN_KIND_SERVER
    assert queue.parent_span_id == infer.span_id
    assert execute.parent_span_id == infer.span_id
    assert [link.span_id for link in execute.links] == [infer.span_id]
    attributes = {a.key: a.value for a in infer.attributes}
    assert attributes["lockgate.model"].string_value == "simple"
    assert attributes["lockgate.request_id"].string_value == "traced-1"
    assert attributes["lockgate.status"].string_value == "OK"
    execute_attributes = {a.key: a.value for a in execute.attributes}
    assert execute_attributes["lockgate.batch_size"].int_value == 1
    resources = [r for r, s in receiver.spans if s.span_id == infer.span_id]
    assert resources[0]["service.name"] == "lockgate"
