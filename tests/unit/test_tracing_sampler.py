"""A process that does not export spans does not record them, yet traces go
on: fresh ids for log lines and ``traceparent``, a caller's decision kept."""

from __future__ import annotations

from opentelemetry import trace

from service.tracing import (
    create_tracer_provider,
    current_trace_headers,
    extract_context,
)

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


def sampled(traceparent: str) -> bool:
    """The sampled bit of a ``traceparent``'s flags."""
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)


def test_a_new_trace_gets_ids_but_is_not_recorded() -> None:
    tracer = create_tracer_provider("unit", export=False).get_tracer("unit")

    with tracer.start_as_current_span("work") as span:
        headers = current_trace_headers()

    assert not span.is_recording()
    context = span.get_span_context()
    assert context.is_valid
    trace_id = trace.format_trace_id(context.trace_id)
    span_id = trace.format_span_id(context.span_id)
    assert headers["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
    assert not sampled(headers["traceparent"])


def test_a_callers_trace_and_sampling_decision_are_kept() -> None:
    tracer = create_tracer_provider("unit", export=False).get_tracer("unit")
    for flags in ("01", "00"):
        caller = extract_context(
            {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-{flags}"}
        )
        with tracer.start_as_current_span("work", context=caller):
            traceparent = current_trace_headers()["traceparent"]

        assert traceparent.startswith(f"00-{CALLER_TRACE}-")
        assert sampled(traceparent) == (flags == "01")
