"""Metrics, log correlation, retention settings and status tables, without servers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from consumer.__main__ import main as consumer_main
from consumer.messages import Delivery
from consumer.processing import follow_up_headers
from consumer.retention import inbox_retention
from consumer.settings import ConsumerSettings
from outbox_relay.__main__ import outbox_retention
from outbox_relay.config import load_settings
from outbox_relay.errors import PublishError, SettingsError
from outbox_relay.queries import OutboxRow
from outbox_relay.relay import MAX_LOGGED_IDS, OutboxRelay, trace_id_of
from outbox_relay.settings import RelaySettings
from outbox_relay.tables import format_seconds, render_table
from service.tracing import current_trace_headers, current_trace_id, extract_context
from tests.unit.test_relay_loop import (
    FakePublisher,
    FakeStore,
    running,
    settings,
    until,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_trace_id_of_reads_only_well_formed_traceparents() -> None:
    assert trace_id_of(TRACEPARENT) == "0af7651916cd43dd8448eb211c80319c"
    assert trace_id_of(None) is None
    assert trace_id_of("00-abc-def-01") is None
    assert trace_id_of("not a header") is None


def rows_with_context(count: int) -> list[OutboxRow]:
    return [
        OutboxRow(
            id=index,
            routing_key="task.created",
            body="{}",
            headers="{}",
            correlation_id=str(index),
            created_at=datetime.now(UTC) - timedelta(seconds=2),
            attempts=0,
            request_id=f"req-{index}",
            traceparent=f"00-{index:032x}-{index:016x}-01",
        )
        for index in range(1, count + 1)
    ]


async def test_a_batch_counts_once_and_names_a_bounded_set_of_ids() -> None:
    rows = rows_with_context(MAX_LOGGED_IDS + 10)
    store = FakeStore(rows)
    publisher = FakePublisher(
        lambda row: PublishError("gone", reason="returned") if row.id == 1 else None
    )
    relay = OutboxRelay(settings(), store=store, publisher=publisher)  # type: ignore[arg-type]
    before = {
        "published": sample("outbox_relay_published_total", routing_key="task.created"),
        "returned": sample("outbox_relay_returned_total", routing_key="task.created"),
        "failed": sample("outbox_relay_publish_failures_total", reason="returned"),
        "latency": sample("outbox_relay_publish_latency_seconds_count"),
        "latency_under_1s": sample(
            "outbox_relay_publish_latency_seconds_bucket", le="1.0"
        ),
        "batches": sample("outbox_relay_batch_duration_seconds_count"),
    }

    with capture_logs() as logs:
        async with running(relay):
            await until(lambda: len(store.published) == len(rows) - 1)

    published = len(rows) - 1
    after = {
        "published": sample("outbox_relay_published_total", routing_key="task.created"),
        "returned": sample("outbox_relay_returned_total", routing_key="task.created"),
        "failed": sample("outbox_relay_publish_failures_total", reason="returned"),
        "latency": sample("outbox_relay_publish_latency_seconds_count"),
        "latency_under_1s": sample(
            "outbox_relay_publish_latency_seconds_bucket", le="1.0"
        ),
        "batches": sample("outbox_relay_batch_duration_seconds_count"),
    }
    assert after["published"] - before["published"] == published
    assert after["returned"] - before["returned"] == 1
    assert after["failed"] - before["failed"] == 1
    assert after["latency"] - before["latency"] == published
    # The rows were created two seconds before they were confirmed.
    assert after["latency_under_1s"] == before["latency_under_1s"]
    assert after["batches"] - before["batches"] >= 1

    [batch] = [e for e in logs if e["event"] == "outbox_batch_published"]
    assert len(batch["request_ids"]) == len(batch["trace_ids"]) == MAX_LOGGED_IDS
    assert batch["request_ids"][0] == "req-2"
    assert batch["trace_ids"][0] == f"{2:032x}"
    per_row = [e for e in logs if e["event"] == "outbox_row_published"]
    assert len(per_row) == published
    assert per_row[-1]["request_id"] == f"req-{len(rows)}"


async def test_the_backlog_gauges_follow_the_store() -> None:
    store = FakeStore(rows_with_context(3))
    publisher = FakePublisher(lambda row: None)
    publisher.ready.clear()  # nothing is published: the backlog stays
    relay = OutboxRelay(
        settings(relay_lag_sample_seconds=0.01),
        store=store,  # type: ignore[arg-type]
        publisher=publisher,  # type: ignore[arg-type]
    )

    async with running(relay):
        await until(lambda: sample("outbox_pending_rows") == 3)

    assert sample("outbox_oldest_pending_age_seconds") == 0.0


def test_retention_settings_have_their_defaults_and_can_be_turned_off() -> None:
    relay = load_settings(RelaySettings, {})
    assert (relay.outbox_retention_hours, relay.retention_interval_seconds) == (
        168.0,
        300.0,
    )
    assert outbox_retention(relay) is not None
    assert (
        outbox_retention(load_settings(RelaySettings, {"OUTBOX_RETENTION_HOURS": "0"}))
        is None
    )
    assert (
        outbox_retention(
            load_settings(RelaySettings, {"RETENTION_INTERVAL_SECONDS": "0"})
        )
        is None
    )

    consumer = load_settings(ConsumerSettings, {})
    assert (consumer.inbox_retention_hours, consumer.retention_interval_seconds) == (
        720.0,
        300.0,
    )
    assert inbox_retention(consumer) is not None
    assert inbox_retention(ConsumerSettings(inbox_retention_hours=0)) is None
    assert inbox_retention(ConsumerSettings(retention_interval_seconds=0)) is None


@pytest.mark.parametrize(
    "environ",
    [
        {"INBOX_RETENTION_HOURS": "0.01"},  # 36 s, under the 300 s back-off
        {"INBOX_RETENTION_HOURS": "-1"},
        {"RETENTION_INTERVAL_SECONDS": "-5"},
    ],
)
def test_an_inbox_retention_that_cannot_be_meant_is_refused(
    environ: dict[str, str],
) -> None:
    with pytest.raises(SettingsError):
        load_settings(ConsumerSettings, environ)


def test_negative_outbox_retention_is_refused() -> None:
    with pytest.raises(SettingsError):
        load_settings(RelaySettings, {"OUTBOX_RETENTION_HOURS": "-1"})


def test_a_delivery_continues_its_trace_in_follow_up_headers() -> None:
    delivery = Delivery(
        message_id="1",
        routing_key="task.created",
        body=b"{}",
        headers={"traceparent": TRACEPARENT.encode(), "x-request-id": b"req-1"},
    )
    tracer = TracerProvider().get_tracer("test")

    # Outside any span the headers are copied as they came.
    assert follow_up_headers(delivery) == {
        "traceparent": TRACEPARENT,
        "x-request-id": "req-1",
    }
    with tracer.start_as_current_span(
        "process", context=extract_context(delivery.headers)
    ):
        trace_id = current_trace_id()
        headers = follow_up_headers(delivery)

    assert trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert headers["x-request-id"] == "req-1"
    assert headers["traceparent"].split("-")[1] == trace_id
    assert headers["traceparent"] != TRACEPARENT
    assert current_trace_headers() == {}
    assert current_trace_id() is None


def test_a_message_without_trace_headers_starts_a_trace() -> None:
    tracer = TracerProvider().get_tracer("test")

    with tracer.start_as_current_span("process", context=extract_context({})):
        trace_id = current_trace_id()

    assert trace_id is not None and int(trace_id, 16) != 0
    assert uuid.UUID(trace_id)


def test_tables_align_numbers_right_and_names_left() -> None:
    table = render_table(
        ("key", "pending"), [("task.created", "3"), ("task.retry", "120")]
    )

    assert table.splitlines() == [
        "key           pending",
        "task.created        3",
        "task.retry        120",
    ]
    assert [format_seconds(s) for s in (None, 0.0421, 3.44, 125, 3723)] == [
        "-",
        "0.042s",
        "3.4s",
        "2m05s",
        "1h02m03s",
    ]


def test_the_consumer_has_a_status_command() -> None:
    assert "status" in consumer_main.commands  # type: ignore[attr-defined]
