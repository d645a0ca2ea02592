"""The API continues or starts a W3C trace and writes it on the outbox row."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from service.app import create_app
from service.registry import load_registry
from service.settings import ServiceSettings

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced_api(
    api_settings: ServiceSettings, spans: InMemorySpanExporter
) -> AsyncIterator[AsyncTestClient[Any]]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = create_app(api_settings, load_registry(), tracer_provider=provider)
    async with AsyncTestClient(app) as client:
        yield client


async def created_row(db: asyncpg.Connection, task_id: str) -> dict[str, Any]:
    row = await db.fetchrow(
        "SELECT o.headers AS outbox, t.trace_headers AS task"
        " FROM outbox o JOIN tasks t ON t.id::text = o.correlation_id"
        " WHERE o.correlation_id = $1",
        task_id,
    )
    assert row is not None
    return {"outbox": json.loads(row["outbox"]), "task": json.loads(row["task"])}


async def test_a_callers_trace_is_continued_by_the_request_span(
    traced_api: AsyncTestClient[Any],
    alice: dict[str, str],
    db: asyncpg.Connection,
    spans: InMemorySpanExporter,
) -> None:
    response = await traced_api.post(
        "/api/v1/tasks",
        json={"title": "traced", "payload": {"text": "x"}},
        headers={
            **alice,
            "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
            "x-request-id": "req-42",
        },
    )
    assert response.status_code == 201

    [server] = [
        span for span in spans.get_finished_spans() if span.kind == SpanKind.SERVER
    ]
    assert format_trace_id(server.context.trace_id) == CALLER_TRACE
    assert server.parent is not None
    assert format_span_id(server.parent.span_id) == CALLER_SPAN

    headers = await created_row(db, response.json()["id"])
    span_id = format_span_id(server.context.span_id)
    assert headers["outbox"] == {
        "x-request-id": "req-42",
        "traceparent": f"00-{CALLER_TRACE}-{span_id}-01",
    }
    assert headers["task"] == headers["outbox"]


@pytest.mark.parametrize(
    "traceparent",
    [None, "00-zz-nonsense-01", "00-" + "0" * 32 + "-" + "1" * 16 + "-01"],
)
async def test_without_a_usable_traceparent_a_new_trace_starts(
    traced_api: AsyncTestClient[Any],
    alice: dict[str, str],
    db: asyncpg.Connection,
    spans: InMemorySpanExporter,
    traceparent: str | None,
) -> None:
    extra = {} if traceparent is None else {"traceparent": traceparent}
    response = await traced_api.post(
        "/api/v1/tasks",
        json={"title": "untraced", "payload": {"text": "x"}},
        headers={**alice, **extra},
    )
    assert response.status_code == 201

    [server] = [
        span for span in spans.get_finished_spans() if span.kind == SpanKind.SERVER
    ]
    assert server.parent is None
    trace_id = format_trace_id(server.context.trace_id)
    headers = await created_row(db, response.json()["id"])
    version, written_trace, _, _ = headers["outbox"]["traceparent"].split("-")
    assert (version, written_trace) == ("00", trace_id)
    assert int(trace_id, 16) != 0


async def test_probes_and_metrics_are_not_traced(
    traced_api: AsyncTestClient[Any], spans: InMemorySpanExporter
) -> None:
    for path in ("/health/live", "/metrics"):
        assert (await traced_api.get(path)).status_code == 200

    assert spans.get_finished_spans() == ()
