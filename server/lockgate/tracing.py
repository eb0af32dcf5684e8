"""OpenTelemetry traces: a span per inference RPC, its queueing, and its batch.

Off by default. ``setup`` turns it on when ``--trace`` is given or the
standard OTEL_* variables ask for traces (``OTEL_TRACES_EXPORTER``, or an
``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT``); spans go over OTLP/HTTP through a
BatchSpanProcessor, sampled per ``OTEL_TRACES_SAMPLER``/``_ARG``.

What one inference produces:

* ``ModelInfer`` (or ``ModelStreamInfer``), kind SERVER: continues the
  caller's W3C ``traceparent`` from the gRPC metadata; ends with the RPC.
* ``queue``, its child: from arrival until the scheduler took the request.
* ``execute``, for the batch: a child of the first request it served and
  LINKED to every request span in it, since one execution serves many traces.

The OpenTelemetry packages are imported by ``setup`` only, which returns a
``Tracer`` (or None when tracing is off). The server hands the tracer to the
servicer and its batch observer to each model version's scheduler; with
tracing off the request path pays one ``is None`` check per RPC and the
scheduler one per batch, and nothing else here runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from lockgate.config import ServerConfig
from lockgate.errors import LockgateError
from lockgate.request import InferRequest
from lockgate.stats import ModelStats

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span
    from opentelemetry.trace import Tracer as OtelTracer

    from lockgate_client._proto import grpc_service_pb2 as pb

log = logging.getLogger("lockgate.tracing")

SERVICE = "inference.GRPCInferenceService"
DEFAULT_SERVICE_NAME = "lockgate"


class RequestTrace:
    """The server span of one inference, carried on ``InferRequest.trace``."""

    __slots__ = ("cancelled", "request", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        #: The decoded request, once the servicer has one (None if decoding failed).
        self.request: InferRequest | None = None
        #: (status code name, message) the servicer found for a cancelled request.
        self.cancelled: tuple[str, str] | None = None

    def attach(self, request: InferRequest) -> None:
        self.request = request
        request.trace = self

    def parent_ids(self) -> tuple[bytes, int, int] | None:
        """(trace id, span id, flags) to carry across the hop to the engine, if sampled.

        The trace id is 128 bits, more than msgpack's integers hold: it travels as bytes.
        """
        context = self.span.get_span_context()
        if not context.trace_flags.sampled:
            return None
        return context.trace_id.to_bytes(16, "big"), context.span_id, int(context.trace_flags)


Infer = Callable[["pb.ModelInferRequest", float | None, RequestTrace | None], Awaitable[Any]]


@dataclass
class _Otel:
    """The OpenTelemetry pieces the request path uses, imported once by setup."""

    provider: TracerProvider
    tracer: OtelTracer
    extract: Callable[..., Any]
    set_span_in_context: Callable[..., Any]
    link: Callable[..., Any]
    status: Callable[..., Any]
    error: Any
    server: Any


class Tracer:
    """Tracing, on: what the servicer and the schedulers are given by the server."""

    def __init__(self, otel: _Otel) -> None:
        self._otel = otel

    async def traced(
        self,
        method: str,
        infer: Infer,
        request: pb.ModelInferRequest,
        deadline: float | None,
        metadata: Iterable[tuple[str, Any]] | None,
    ) -> Any:
        """Run ``infer`` inside a SERVER span continuing the caller's trace context."""
        return await _traced(self._otel, method, infer, request, deadline, metadata)

    def observe_batch(
        self, stats: ModelStats, batch: list[InferRequest], error: BaseException | None
    ) -> None:
        """The schedulers' batch observer: one ``execute`` span per batch that ran."""
        try:
            _execute_span(self._otel, stats, batch, error)
        except Exception:  # tracing must never keep results from their callers
            log.exception("cannot record the execute span of a %s batch", stats.name)

    def remote_parent(self, ids: tuple[bytes, int, int]) -> RequestTrace:
        """In the engine process: a front end's server span, parent of the engine's spans."""
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        trace_id, span_id, flags = ids
        context = SpanContext(
            int.from_bytes(trace_id, "big"), span_id, is_remote=True, trace_flags=TraceFlags(flags)
        )
        return RequestTrace(NonRecordingSpan(context))

    def shutdown(self) -> None:
        """Flush the spans still buffered."""
        self._otel.provider.shutdown()


def wanted(config: ServerConfig) -> bool:
    """Whether the flags or the OTEL_* environment ask for traces."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(
        config.trace
        or exporters
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup(config: ServerConfig, processor: SpanProcessor | None = None) -> Tracer | None:
    """A tracer if the config or environment want one (or given a ``processor``: tests)."""
    if processor is None and not wanted(config):
        return None
    from opentelemetry import propagate
    from opentelemetry import trace as api
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from lockgate import __version__

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # The SDK reads OTEL_TRACES_SAMPLER itself; without it, --trace samples
    # config.trace_ratio of new traces and follows the caller's decision.
    sampler = (
        None
        if os.environ.get("OTEL_TRACES_SAMPLER")
        else ParentBased(TraceIdRatioBased(config.trace_ratio))
    )
    provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False)
    processors = [processor] if processor is not None else _processors()
    for each in processors:
        provider.add_span_processor(each)
    otel = _Otel(
        provider=provider,
        tracer=provider.get_tracer("lockgate", __version__),
        extract=propagate.extract,
        set_span_in_context=api.set_span_in_context,
        link=api.Link,
        status=api.Status,
        error=api.StatusCode.ERROR,
        server=api.SpanKind.SERVER,
    )
    log.info(
        "tracing on: service %s, exporter %s",
        resource.attributes.get(SERVICE_NAME),
        os.environ.get("OTEL_TRACES_EXPORTER", "otlp") if processor is None else "(given)",
    )
    return Tracer(otel)


def _processors() -> list[SpanProcessor]:
    """One BatchSpanProcessor per exporter named in OTEL_TRACES_EXPORTER (default otlp)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    processors: list[SpanProcessor] = []
    for name in filter(None, names):
        if name in ("otlp", "otlp_proto_http"):
            protocol = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            )
            if protocol != "http/protobuf":
                log.warning("OTLP protocol %r is not supported; exporting over HTTP", protocol)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Endpoint, headers, timeout and compression come from OTEL_EXPORTER_OTLP_*.
            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            log.warning("unknown trace exporter %r ignored (use otlp or console)", name)
    return processors


# --- the request path (only reached with a tracer) ------------------------------------


async def _traced(
    otel: _Otel,
    method: str,
    infer: Infer,
    request: pb.ModelInferRequest,
    deadline: float | None,
    metadata: Iterable[tuple[str, Any]] | None,
) -> Any:
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    attributes: dict[str, str] = {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": method,
        "lockgate.model": request.model_name,
    }
    if request.model_version:
        attributes["lockgate.model_version"] = request.model_version
    if request.id:
        attributes["lockgate.request_id"] = request.id
    span = otel.tracer.start_span(
        method, context=otel.extract(carrier), kind=otel.server, attributes=attributes
    )
    trace = RequestTrace(span)
    try:
        response = await infer(request, deadline, trace)
    except LockgateError as exc:
        _end(otel, trace, exc.code.name, exc.code.value[0], exc.message)
        raise
    except asyncio.CancelledError:
        status, message = trace.cancelled or (
            "CANCELLED",
            "the caller cancelled or its deadline passed",
        )
        _end(otel, trace, status, grpc.StatusCode[status].value[0], message)
        raise
    except Exception as exc:
        _end(otel, trace, "INTERNAL", 13, f"internal error: {exc}")
        raise
    span.set_attribute("lockgate.model_version", response.model_version)
    _end(otel, trace, "OK", 0, None)
    return response


def _end(otel: _Otel, trace: RequestTrace, status: str, code: int, error: str | None) -> None:
    span = trace.span
    request = trace.request
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code)
        span.set_attribute("lockgate.status", status)
        if request is not None:
            span.set_attribute("lockgate.rows", request.rows)
            _queue_span(otel, request, error if not request.dequeue_ns else None)
        if error is not None:
            span.set_status(otel.status(otel.error, error))
    span.end()


def _queue_span(otel: _Otel, request: InferRequest, error: str | None) -> None:
    """Arrival → taken by the scheduler (or → now, for a request that never was)."""
    assert request.trace is not None
    offset = time.time_ns() - time.monotonic_ns()
    end = request.dequeue_ns or time.monotonic_ns()
    span = otel.tracer.start_span(
        "queue",
        context=otel.set_span_in_context(request.trace.span),
        start_time=request.arrival_ns + offset,
    )
    if error is not None:
        span.set_status(otel.status(otel.error, error))
    span.end(end_time=end + offset)


def _execute_span(
    otel: _Otel, stats: ModelStats, batch: list[InferRequest], error: BaseException | None
) -> None:
    traces = [r.trace for r in batch if isinstance(r.trace, RequestTrace)]
    # Sampled rather than recording: in the engine process the server span is
    # a front end's, known here by its context only.
    recording = [t for t in traces if t.span.get_span_context().trace_flags.sampled]
    if not recording:
        return
    offset = time.time_ns() - time.monotonic_ns()
    rows = sum(r.rows for r in batch)
    span = otel.tracer.start_span(
        "execute",
        context=otel.set_span_in_context(recording[0].span),
        links=[otel.link(t.span.get_span_context()) for t in traces],
        start_time=batch[0].dequeue_ns + offset,
        attributes={
            "lockgate.model": stats.name,
            "lockgate.model_version": stats.version,
            "lockgate.batch_size": rows,
            "lockgate.batch_requests": len(batch),
            "lockgate.status": "OK" if error is None else "ERROR",
        },
    )
    if error is not None:
        span.set_status(otel.status(otel.error, str(error)))
    span.end()
