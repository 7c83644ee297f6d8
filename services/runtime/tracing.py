"""OpenTelemetry: one tracer per service, W3C trace context carried in NATS message headers.

A span started in one service continues in the next because the publisher injects ``traceparent``
into the message headers and the consumer extracts it as the parent of its own span. Exporters:
``otlp`` (Jaeger, OTLP/HTTP), ``file`` (JSON lines, what ``voicebus trace`` reads), ``console``, ``none``.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.runtime.log import redact

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_file: IO[str] | None = None


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


def setup(
    service: str, replica: str, exporter: str, *, trace_file: str = "", otlp_endpoint: str = ""
) -> None:
    """Install the tracer provider for this process (once); spans are batched off the hot path."""
    global _provider, _file
    if _provider is not None:
        return
    resource = Resource.create(
        {
            "service.name": f"voicebus-{service}",
            "service.instance.id": replica,
            "service.namespace": "voicebus",
        }
    )
    provider = TracerProvider(resource=resource)
    span_exporter: SpanExporter | None = None
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")
    elif exporter == "file":
        Path(trace_file).parent.mkdir(parents=True, exist_ok=True)
        _file = open(trace_file, "a", buffering=1)  # noqa: SIM115  # closed in shutdown()
        span_exporter = ConsoleSpanExporter(out=_file, formatter=_one_line)
    elif exporter == "console":
        span_exporter = ConsoleSpanExporter(formatter=_one_line)
    if span_exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(span_exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    atexit.register(shutdown)


def shutdown() -> None:
    """Flush and stop exporting (on drain and at exit)."""
    global _provider, _file
    if _provider is not None:
        _provider.shutdown()
        _provider = None
    if _file is not None:
        _file.close()
        _file = None


def tracer() -> trace.Tracer:
    """The voicebus tracer (a no-op one until ``setup`` ran)."""
    return trace.get_tracer("voicebus")


def inject(headers: dict[str, str] | None = None, span: Span | None = None) -> dict[str, str]:
    """Headers carrying the trace context of ``span`` (default: the current span)."""
    carrier: dict[str, str] = {} if headers is None else headers
    ctx = trace.set_span_in_context(span) if span is not None else None
    _propagator.inject(carrier, context=ctx)
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """The remote parent context carried by message headers, if any."""
    if not headers or "traceparent" not in headers:
        return None
    return _propagator.extract(headers)


def context_of(span: Span) -> otel_context.Context:
    """A context whose current span is ``span``, to parent spans started later or elsewhere."""
    return trace.set_span_in_context(span)


@contextmanager
def span(name: str, parent: otel_context.Context | None = None, **attributes: Any) -> Iterator[Span]:
    """A span with redacted attributes, child of ``parent`` (a remote context) or of the current span."""
    with tracer().start_as_current_span(name, context=parent, attributes=clean(attributes)) as s:
        yield s


def clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes safe to export: strings redacted, ``None`` dropped."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in attributes.items() if v is not None}
