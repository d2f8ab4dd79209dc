"""Optional OpenTelemetry tracing: one server span per call when `opentelemetry-api` is installed.

Without the package, `call_span` is a no-op and costs nothing; with the API but
no SDK configured (no tracer provider set) it is a no-op too. Exporters,
sampling and resources are the application's choice, set up the standard way
(e.g. `opentelemetry-instrument embedrpc serve ...` with OTEL_* variables).
The caller's trace context (W3C `traceparent` in gRPC metadata or HTTP
headers) becomes the span's parent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import (
        NoOpTracer,
        NoOpTracerProvider,
        ProxyTracer,
        ProxyTracerProvider,
        SpanKind,
        Status,
        StatusCode,
    )
except ImportError:  # optional dependency
    trace = None  # type: ignore[assignment]

ENABLED = trace is not None
_TRACER: Any = trace.get_tracer("embedrpc") if ENABLED else None


class _NoSpan:
    """Stands in for a span when tracing is off."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def set_error(self, code: str, message: str) -> None:
        pass


_NO_SPAN = _NoSpan()
NO_SPAN = _NO_SPAN  # what call_span gives when no span is made


class _Span:
    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    def set_attribute(self, key: str, value: Any) -> None:
        self._span.set_attribute(key, value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self._span.set_attributes(attributes)

    def set_error(self, code: str, message: str) -> None:
        self._span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"))


def _recording() -> bool:
    """Whether spans go anywhere: the API is installed and a tracer provider (an SDK) is
    set. With the API alone every span is a no-op, and making one for each call (parsing
    its traceparent, entering its context) took about 40 µs of a single-text call."""
    tracer = _TRACER
    if isinstance(tracer, ProxyTracer):  # follows the global provider, once one is set
        provider = trace.get_tracer_provider()
        return not isinstance(provider, ProxyTracerProvider | NoOpTracerProvider)
    return not isinstance(tracer, NoOpTracer)


class _NoSpanContext:
    """call_span when no span is made: one shared object, no generator per call."""

    def __enter__(self) -> _NoSpan:
        return _NO_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN_CONTEXT = _NoSpanContext()


def call_span(name: str, headers: Mapping[str, str],
              attributes: Mapping[str, Any]) -> contextlib.AbstractContextManager[Any]:
    """A SERVER span around one call, child of the trace context in `headers`."""
    if not ENABLED or not _recording():
        return _NO_SPAN_CONTEXT
    return _call_span(name, headers, attributes)


@contextlib.contextmanager
def _call_span(name: str, headers: Mapping[str, str],
               attributes: Mapping[str, Any]) -> Iterator[_Span]:
    parent = propagate.extract(dict(headers))
    with _TRACER.start_as_current_span(name, context=parent, kind=SpanKind.SERVER,
                                       attributes=dict(attributes),
                                       record_exception=False,
                                       set_status_on_exception=False) as span:
        yield _Span(span)
