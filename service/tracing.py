"""W3C trace context from the HTTP request to the last follow-up message.

The API continues the caller's trace (``traceparent``) or starts one, and
writes the ``traceparent`` of its request span on every outbox row the
request adds. The relay copies row headers into AMQP headers unchanged; the
consumer continues the trace from the message's headers in a span of its own
and writes that span's ``traceparent`` on the rows it adds, so one task's
messages, however many retries, share one trace id, and log lines carry it as
``trace_id``.

Spans are exported only when ``OTEL_ENABLED=true`` or
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; the OTLP exporter then reads the
standard ``OTEL_EXPORTER_OTLP_*`` variables itself. A process that does not
export does not record either: its spans are the SDK's non-recording spans,
which still get fresh trace and span ids, so log lines and ``traceparent``
headers are the same, at half the cost per request or message. Such a
process marks the traces it starts as not sampled (``-00``) and keeps a
caller's decision; so a trace that should be exported from the consumer on
must start in a process that exports too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator,
)

#: Headers that carry the trace context (W3C Trace Context).
TRACE_HEADERS = ("traceparent", "tracestate")

_PROPAGATOR = TraceContextTextMapPropagator()


def tracing_exported(otel_enabled: bool, otlp_endpoint: str) -> bool:
    """Whether spans leave the process: asked for, or an endpoint is set."""
    return otel_enabled or bool(otlp_endpoint.strip())


def create_tracer_provider(service_name: str, *, export: bool) -> TracerProvider:
    """A tracer provider of the process's own, exporting over OTLP if ``export``.

    ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` still apply; the
    provider is not installed globally, so tests can make as many as they
    like. Shut it down on exit to flush what the exporter still holds.
    """
    attributes = (
        {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    )
    if not export:
        # Recording spans nobody exports costs CPU on every request; the
        # caller's sampling decision still travels on.
        return TracerProvider(
            resource=Resource.create(attributes), sampler=ParentBased(ALWAYS_OFF)
        )

    # Imported here: a process that does not export never loads it.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter,
    )

    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def extract_context(headers: Mapping[str, object]) -> Context:
    """The trace context a message's headers carry (an empty one if none)."""
    carrier: dict[str, str] = {}
    for name in TRACE_HEADERS:
        value = headers.get(name)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, str):
            carrier[name] = value
    return _PROPAGATOR.extract(carrier)


def current_trace_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the current span; {} if none."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits; None outside a span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id)
