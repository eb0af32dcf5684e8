"""W3C trace context for outgoing calls, when OpenTelemetry is present.

The SDK does not depend on OpenTelemetry: it is imported lazily, once, and
when it is missing (or no span is active) calls carry no trace headers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["trace_metadata"]

_otel: tuple[Any, Any] | None = None
_otel_missing = False


def _load() -> tuple[Any, Any] | None:
    global _otel, _otel_missing
    if _otel is None and not _otel_missing:
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            _otel_missing = True
        else:
            _otel = (propagate, trace)
    return _otel


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """``traceparent``/``tracestate`` pairs for the active span, or nothing."""
    otel = _load()
    if otel is None:
        return ()
    propagate, trace = otel
    if not trace.get_current_span().get_span_context().is_valid:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    # gRPC metadata keys must be lowercase; W3C header names already are.
    return tuple((key.lower(), value) for key, value in carrier.items())
