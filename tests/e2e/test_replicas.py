"""Three relays and three consumers share the work and keep each task's order."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from service.handlers import checksum_of
from tests.conftest import AMQP_URL
from tests.e2e.test_pipeline import submit
from tests.support.processes import ProcessGroup
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

RELAYS = 3
CONSUMERS = 3

#: The task mix: (how many, what each task's events are).
CHECKSUM = 1700  # created, completed
RETRIED = 200  # created, retry, completed (the handler fails once)
REFAILED = 60  # created, failed, then retried by the API: retry, failed
CANCELLED = 40  # created (scheduled 5 s ahead), cancelled before it is due

TOTAL = CHECKSUM + RETRIED + REFAILED + CANCELLED


class EventLog:
    """Every message the broker routes to a queue bound to all events."""

    def __init__(self) -> None:
        self.by_task: dict[str, list[int]] = defaultdict(list)
        self.received = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        assert message.correlation_id is not None and message.message_id is not None
        self.by_task[message.correlation_id].append(int(message.message_id))
        self.received += 1
        await message.ack()


@pytest.fixture
async def all_events(amqp_prefix: str) -> AsyncIterator[EventLog]:
    """A queue under the test's prefix bound to every routing key.

    Exclusive, so the broker deletes it with the connection however the test
    ends; it is deleted explicitly as well.
    """
    log = EventLog()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        exchange = await channel.declare_exchange(
            f"{amqp_prefix}.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            f"{amqp_prefix}.test-all-events", exclusive=True
        )
        await queue.bind(exchange, "#")
        await queue.consume(log.on_message)
        yield log
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


async def submit_all(
    client: httpx.AsyncClient, bodies: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    semaphore = asyncio.Semaphore(24)

    async def one(body: dict[str, Any]) -> dict[str, Any]:
        async with semaphore:
            return await submit(client, body)

    return await asyncio.gather(*(one(body) for body in bodies))


async def count(db: asyncpg.Connection, sql: str, *args: Any) -> int:
    value: int = await db.fetchval(sql, *args)
    return value


async def test_three_relays_and_consumers_keep_invariants_and_per_task_order(
    processes: ProcessGroup, db: asyncpg.Connection, all_events: EventLog
) -> None:
    started = time.monotonic()
    processes.start("api", DB_POOL_SIZE="20")
    for i in range(RELAYS):
        processes.start(f"relay-{i}", RELAY_NAME=f"relay-{i}")
    for i in range(CONSUMERS):
        processes.start(f"consumer-{i}", CONSUMER_PREFETCH="16")
    await processes.wait_ready()

    checksum_bodies = [
        {"title": f"hash {i}", "payload": {"text": f"text-{i}", "rounds": 1 + i % 3}}
        for i in range(CHECKSUM)
    ]
    retried_bodies = [
        {"title": f"retried {i}", "type": "fail_times", "payload": {"fail_first": 1}}
        for i in range(RETRIED)
    ]
    refailed_bodies = [
        {"title": f"refailed {i}", "type": "non_retryable", "max_attempts": 1}
        for i in range(REFAILED)
    ]
    async with processes.api_client() as client:
        # Each scheduled task is cancelled right after it was created, well
        # before it is due; its task.cancelled waits behind its task.created.
        to_cancel = []
        for i in range(CANCELLED):
            run_at = datetime.now(UTC) + timedelta(seconds=5)
            task = await submit(
                client,
                {
                    "title": f"cancelled {i}",
                    "payload": {"text": "x"},
                    "run_at": run_at.isoformat(),
                },
            )
            response = await client.delete(f"/api/v1/tasks/{task['id']}")
            assert response.status_code == 200, response.text
            to_cancel.append(task)
        refailed = await submit_all(client, refailed_bodies)
        checksums, retried = await asyncio.gather(
            submit_all(client, checksum_bodies), submit_all(client, retried_bodies)
        )
        submitted = time.monotonic()

        refailed_ids = [uuid.UUID(task["id"]) for task in refailed]

        async def refailed_once() -> bool:
            failed = await count(
                db,
                "SELECT count(*) FROM tasks WHERE id = ANY($1) AND status = 'FAILED'",
                refailed_ids,
            )
            return failed == REFAILED

        await eventually(refailed_once, 60, "the non-retryable tasks to fail")
        for task in refailed:
            response = await client.post(f"/api/v1/tasks/{task['id']}/retry")
            assert response.status_code == 200, response.text

        async def settled() -> bool:
            failed_events = await count(
                db,
                "SELECT count(*) FROM outbox WHERE routing_key = 'task.failed'",
            )
            unfinished = await count(
                db,
                "SELECT count(*) FROM tasks WHERE status NOT IN"
                " ('COMPLETED', 'FAILED', 'CANCELLED')",
            )
            unpublished = await count(
                db, "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            )
            return failed_events == 2 * REFAILED and unfinished == unpublished == 0

        await eventually(settled, 90, "every task terminal and every row published")
    processed = time.monotonic()

    rows = await db.fetch("SELECT id, correlation_id, routing_key FROM outbox")

    async def all_received() -> bool:
        return all_events.received >= len(rows)

    await eventually(all_received, 30, "every event in the test's queue")

    # Invariant 1 and 3: every task terminal, in the status its kind ends in.
    statuses = {
        str(row["id"]): (row["status"], row["attempts"], row["result"])
        for row in await db.fetch("SELECT id, status, attempts, result FROM tasks")
    }
    assert len(statuses) == TOTAL
    for task, body in zip(checksums, checksum_bodies, strict=True):
        payload = body["payload"]
        assert statuses[task["id"]][:2] == ("COMPLETED", 1)
        expected = checksum_of(payload["text"], payload["rounds"])
        assert json.loads(statuses[task["id"]][2]) == expected
    assert {statuses[t["id"]][:2] for t in retried} == {("COMPLETED", 2)}
    assert {statuses[t["id"]][:2] for t in refailed} == {("FAILED", 1)}
    assert {statuses[t["id"]][:2] for t in to_cancel} == {("CANCELLED", 0)}

    # Invariant 2: one completion event per completed task, none for others.
    events: dict[str, list[str]] = defaultdict(list)
    for row in sorted(rows, key=lambda row: row["id"]):
        events[row["correlation_id"]].append(row["routing_key"])
    expected_events = {
        **{t["id"]: ["task.created", "task.completed"] for t in checksums},
        **{t["id"]: ["task.created", "task.retry", "task.completed"] for t in retried},
        **{
            t["id"]: ["task.created", "task.failed", "task.retry", "task.failed"]
            for t in refailed
        },
        **{t["id"]: ["task.created", "task.cancelled"] for t in to_cancel},
    }
    assert dict(events) == expected_events

    # Per-task order: each task's messages reached the broker (and so the
    # queue bound to every event) in the order they were written, each once
    # in a run without faults.
    ids_by_task: dict[str, list[int]] = defaultdict(list)
    for row in sorted(rows, key=lambda row: row["id"]):
        ids_by_task[row["correlation_id"]].append(row["id"])
    out_of_order = {
        task: arrived
        for task, arrived in all_events.by_task.items()
        if arrived != ids_by_task[task]
    }
    assert not out_of_order, list(out_of_order.items())[:5]
    assert set(all_events.by_task) == set(ids_by_task)

    # The work was shared: every relay published and every consumer processed.
    for i in range(RELAYS):
        batches = [
            event
            for event in processes.log_events(f"relay-{i}")
            if event.get("event") == "outbox_batch_published"
        ]
        assert sum(event["count"] for event in batches) > 0, f"relay-{i} idle"
    for i in range(CONSUMERS):
        handled = [
            event
            for event in processes.log_events(f"consumer-{i}")
            if event.get("event") == "task_processed"
        ]
        assert handled, f"consumer-{i} idle"

    print(
        f"\n{TOTAL} tasks, {len(rows)} events: submitted in"
        f" {submitted - started:.1f} s, settled after {processed - started:.1f} s"
    )
