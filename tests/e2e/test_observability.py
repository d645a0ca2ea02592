"""Metrics, logs and traces of the real processes, after real traffic."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AMQP_URL
from tests.e2e.test_pipeline import all_terminal, submit
from tests.support.processes import ProcessGroup
from tests.support.proxy import free_port
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``url``'s /metrics, by name and sorted labels."""
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{url}/metrics")
    response.raise_for_status()
    # Exactly the exposition format's own type: Prometheus refuses a
    # repeated parameter.
    assert response.headers.get_list("content-type") == [CONTENT_TYPE_LATEST]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    **labels: str,
) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        sample
        for (sample_name, sample_labels), sample in samples.items()
        if sample_name == name and wanted <= set(sample_labels)
    )


async def test_metrics_of_every_process_move_with_the_traffic(
    processes: ProcessGroup, db: asyncpg.Connection, amqp_prefix: str
) -> None:
    relay_port, consumer_port = free_port(), free_port()
    relay_url = f"http://127.0.0.1:{relay_port}"
    consumer_url = f"http://127.0.0.1:{consumer_port}"
    processes.start("api")
    processes.start("consumer", CONSUMER_HEALTH_PORT=str(consumer_port))
    processes.start(
        "relay",
        RELAY_HEALTH_PORT=str(relay_port),
        RELAY_LAG_SAMPLE_SECONDS="0.2",
        RELAY_MAX_ATTEMPTS="2",
        RELAY_RETRY_BASE_SECONDS="0.1",
    )
    await processes.wait_ready()

    async with processes.api_client() as client:
        for i in range(5):
            await submit(client, {"title": f"hash {i}", "payload": {"text": str(i)}})
        await submit(
            client,
            {"title": "retried", "type": "fail_times", "payload": {"fail_first": 1}},
        )
        await submit(client, {"title": "doomed", "type": "non_retryable"})
    # Nobody listens to this routing key: returned, retried, parked.
    await db.execute("INSERT INTO outbox (routing_key, body) VALUES ('nobody', '{}')")
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(f"{amqp_prefix}.events")
        await exchange.publish(
            aio_pika.Message(b"not json", message_id="poison"),
            routing_key="task.created",
        )

    await eventually(lambda: all_terminal(db, 7), 60, "seven terminal tasks")

    async def relay_settled() -> bool:
        samples = await scrape(relay_url)
        return value(samples, "outbox_relay_rows_dead_total") == 1 and (
            value(samples, "outbox_pending_rows") == 0
        )

    await eventually(relay_settled, 30, "the relay's metrics to catch up")
    api = await scrape(processes.api_url)
    relay = await scrape(relay_url)
    consumer = await scrape(consumer_url)

    assert value(api, "outbox_tasks_api_requests_total", method="POST") >= 7
    assert value(api, "outbox_tasks_api_request_duration_seconds_count") >= 7

    # Created x7, retry x1, completed x6, failed x1.
    published = value(relay, "outbox_relay_published_total")
    assert published == 15, relay
    assert value(relay, "outbox_relay_published_total", routing_key="task.retry") == 1
    assert value(relay, "outbox_relay_publish_latency_seconds_count") == published
    assert value(relay, "outbox_relay_batch_duration_seconds_count") >= 1
    assert value(relay, "outbox_relay_returned_total", routing_key="nobody") == 2
    assert value(relay, "outbox_relay_publish_failures_total", reason="returned") == 2
    assert ("outbox_oldest_pending_age_seconds", ()) in relay

    processed = "consumer_messages_processed_total"
    assert value(consumer, processed, outcome="completed") == 6
    assert value(consumer, processed, outcome="retry_scheduled") == 1
    assert value(consumer, processed, outcome="failed") == 1
    assert value(consumer, "consumer_duplicates_skipped_total") == 0
    assert value(consumer, "consumer_dead_lettered_total", reason="not_json") == 1
    handled = "consumer_handler_duration_seconds_count"
    assert value(consumer, handled, task_type="checksum") == 5
    assert value(consumer, handled, task_type="fail_times") == 2
    end_to_end = "consumer_task_end_to_end_seconds_count"
    assert value(consumer, end_to_end, status="COMPLETED") == 6
    assert value(consumer, end_to_end, status="FAILED") == 1
    # Each process exposes its own metrics only.
    assert not any(name.startswith("outbox_relay_") for name, _ in consumer)
    assert not any(name.startswith("consumer_") for name, _ in relay)


async def test_one_request_is_found_in_the_logs_of_all_three_processes(
    processes: ProcessGroup, db: asyncpg.Connection
) -> None:
    for name in ("api", "relay", "consumer"):
        processes.start(name)
    await processes.wait_ready()

    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with processes.api_client() as client:
        traced = await client.post(
            "/api/v1/tasks",
            json={"title": "traced", "payload": {"text": "t"}},
            headers={
                "X-Request-ID": "req-traced-1",
                "traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01",
            },
        )
        untraced = await client.post(
            "/api/v1/tasks", json={"title": "untraced", "payload": {"text": "u"}}
        )
    assert traced.status_code == untraced.status_code == 201
    assert traced.headers["x-request-id"] == "req-traced-1"
    await eventually(lambda: all_terminal(db, 2), 60, "both tasks to complete")

    rows = await db.fetch(
        "SELECT correlation_id, routing_key, headers FROM outbox ORDER BY id"
    )
    headers: dict[str, dict[str, Any]] = {}
    for row in rows:
        headers.setdefault(row["correlation_id"], {})[row["routing_key"]] = json.loads(
            row["headers"]
        )

    for response, expected_trace in ((traced, caller_trace), (untraced, None)):
        task_id = response.json()["id"]
        request_id = response.headers["x-request-id"]
        created = headers[task_id]["task.created"]
        completed = headers[task_id]["task.completed"]
        trace_id = created["traceparent"].split("-")[1]
        if expected_trace is not None:
            assert trace_id == expected_trace
        assert len(trace_id) == 32 and int(trace_id, 16) != 0
        # The follow-up event stays in the same trace and request.
        assert completed["traceparent"].split("-")[1] == trace_id
        assert completed["x-request-id"] == created["x-request-id"] == request_id
        task = await db.fetchrow(
            "SELECT trace_headers FROM tasks WHERE id = $1", uuid.UUID(task_id)
        )
        assert task is not None
        assert json.loads(task["trace_headers"]) == created

        api = [
            event
            for event in processes.log_events("api")
            if event.get("event") == "http_request"
            and event.get("request_id") == request_id
        ]
        assert [event["trace_id"] for event in api] == [trace_id]

        relay = [
            event
            for event in processes.log_events("relay")
            if event.get("event") == "outbox_batch_published"
            and request_id in event.get("request_ids", [])
        ]
        assert relay and all(trace_id in event["trace_ids"] for event in relay)

        consumer = [
            event
            for event in processes.log_events("consumer")
            if event.get("event") == "task_processed"
            and event.get("task_id") == task_id
        ]
        assert [(e["request_id"], e["trace_id"]) for e in consumer] == [
            (request_id, trace_id)
        ]
