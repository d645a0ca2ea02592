"""The consumer against real PostgreSQL and RabbitMQ, run in-process.

Each test inserts task rows directly, publishes work messages to
``{prefix}.events`` the way the relay would, and polls the database with a
deadline until the consumer has done its part.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect

from consumer import queries
from consumer.consumer import TaskConsumer
from consumer.settings import ConsumerSettings
from consumer.topology import TopologyNames, declare_topology
from service.handlers import checksum_of
from service.registry import load_registry
from tests.conftest import AMQP_URL, ROOT
from tests.handlers import LEDGER_TABLE_DDL

pytestmark = pytest.mark.timeout(60)

REGISTRY = load_registry("tests.handlers")

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T | None]], what: str, within: float = 15.0
) -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``within``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


class Harness:
    """One test's database, broker prefix and consumers."""

    def __init__(
        self,
        database_url: str,
        prefix: str,
        db: asyncpg.Connection,
        amqp: AbstractConnection,
    ) -> None:
        self.database_url = database_url
        self.prefix = prefix
        self.names = TopologyNames.for_prefix(prefix)
        self.db = db
        self.amqp = amqp
        self._running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    def settings(self, **overrides: Any) -> ConsumerSettings:
        values: dict[str, Any] = {
            "database_url": self.database_url,
            "amqp_url": AMQP_URL,
            "amqp_prefix": self.prefix,
            "consumer_cancel_poll_interval": 0.1,
            "consumer_shutdown_grace_seconds": 5.0,
            "retry_backoff_base_seconds": 0.05,
            "retry_backoff_max_seconds": 1.0,
        }
        values.update(overrides)
        return ConsumerSettings(**values)

    async def start(self, **overrides: Any) -> TaskConsumer:
        """Run a consumer in the background until the test ends (or ``stop``)."""
        consumer = TaskConsumer(self.settings(**overrides), REGISTRY)
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop), name="test-consumer")
        self._running.append((stop, task))

        ready = asyncio.create_task(consumer.ready.wait())
        await asyncio.wait({ready, task}, timeout=15, return_when="FIRST_COMPLETED")
        if task.done():
            ready.cancel()
            task.result()
            raise AssertionError("the consumer stopped before it was ready")
        assert consumer.ready.is_set(), "the consumer did not become ready"
        return consumer

    async def stop_all(self) -> None:
        for stop, _ in self._running:
            stop.set()
        for _, task in self._running:
            await asyncio.wait_for(task, timeout=20)
        self._running.clear()

    async def stop(self, consumer_index: int = -1) -> None:
        stop, task = self._running.pop(consumer_index)
        stop.set()
        await asyncio.wait_for(task, timeout=20)

    async def exchange(self) -> AbstractExchange:
        if self._exchange is None:
            self._channel = await self.amqp.channel()
            self._exchange = await self._channel.get_exchange(
                self.names.events_exchange
            )
        return self._exchange

    async def insert_task(
        self,
        task_type: str,
        payload: Mapping[str, Any],
        *,
        status: str = "PENDING",
        max_attempts: int = 3,
        attempts: int = 0,
        result: Any = None,
    ) -> uuid.UUID:
        task_id = uuid.uuid4()
        await self.db.execute(
            """
            INSERT INTO tasks (id, title, type, payload, priority, status,
                               attempts, max_attempts, result)
            VALUES ($1, 'test task', $2, $3, 'MEDIUM', $4, $5, $6, $7)
            """,
            task_id,
            task_type,
            payload,
            status,
            attempts,
            max_attempts,
            result,
        )
        return task_id

    async def publish_body(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        routing_key: str = "task.created",
        correlation_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str | None:
        exchange = await self.exchange()
        await exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                correlation_id=correlation_id,
                type=routing_key,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=dict(headers or {}),
            ),
            routing_key=routing_key,
        )
        return message_id

    async def publish(
        self,
        task_id: uuid.UUID,
        task_type: str,
        *,
        message_id: str | None = None,
        routing_key: str = "task.created",
        headers: Mapping[str, str] | None = None,
    ) -> str:
        message_id = message_id or f"test-{secrets.token_hex(6)}"
        body = json.dumps({"task_id": str(task_id), "type": task_type}).encode()
        await self.publish_body(
            body,
            message_id=message_id,
            routing_key=routing_key,
            correlation_id=str(task_id),
            headers=headers,
        )
        return message_id

    async def publish_abandoned(
        self, task_id: uuid.UUID, task_type: str, *, copies: int = 1
    ) -> str:
        """Publish ``copies`` of one work message and take each the way a
        consumer that dies does: delivered, never acknowledged. The broker
        puts them back marked redelivered, as it would after a crash. Call
        before ``start``, or a running consumer may take a fresh copy first."""
        settings = self.settings()
        channel = await self.amqp.channel()
        try:
            await declare_topology(
                channel,
                self.names,
                delivery_limit=settings.consumer_delivery_limit,
                task_events_max_length=settings.task_events_max_length,
            )
            message_id = await self.publish(task_id, task_type)
            for _ in range(copies - 1):
                await self.publish(task_id, task_type, message_id=message_id)
            queue = await channel.get_queue(self.names.tasks_queue)

            async def delivered() -> aio_pika.abc.AbstractIncomingMessage | None:
                return await queue.get(no_ack=False, fail=False)

            for _ in range(copies):
                taken = await eventually(delivered, "the message to be delivered")
                assert taken.message_id == message_id and not taken.redelivered
        finally:
            await channel.close()
        return message_id

    async def task(self, task_id: uuid.UUID) -> asyncpg.Record:
        row = await self.db.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
        assert row is not None
        return row

    async def wait_status(
        self, task_id: uuid.UUID, status: str, within: float = 15.0
    ) -> asyncpg.Record:
        async def check() -> asyncpg.Record | None:
            row = await self.task(task_id)
            return row if row["status"] == status else None

        return await eventually(check, f"task {task_id} to be {status}", within)

    async def wait_inbox(self, message_id: str) -> None:
        async def check() -> bool:
            found = await self.db.fetchval(
                "SELECT count(*) FROM inbox WHERE message_id = $1", message_id
            )
            return bool(found)

        await eventually(check, f"inbox row for {message_id}")

    async def outbox(
        self, task_id: uuid.UUID, routing_key: str | None = None
    ) -> list[asyncpg.Record]:
        return await self.db.fetch(
            """
            SELECT * FROM outbox
             WHERE correlation_id = $1 AND ($2::text IS NULL OR routing_key = $2)
             ORDER BY id
            """,
            str(task_id),
            routing_key,
        )

    async def inbox_count(self, message_id: str) -> int:
        count: int = await self.db.fetchval(
            "SELECT count(*) FROM inbox WHERE message_id = $1", message_id
        )
        return count

    async def sentinel(self) -> None:
        """Run one checksum task through; with prefetch 1 every earlier message
        has been settled once it completes."""
        task_id = await self.insert_task("checksum", {"text": "sentinel"})
        await self.publish(task_id, "checksum")
        await self.wait_status(task_id, "COMPLETED")

    async def relay_due(self, row: asyncpg.Record) -> str:
        """Publish an outbox row as the relay would, once it is due."""

        async def due() -> bool:
            return bool(
                await self.db.fetchval(
                    "SELECT now() >= available_at FROM outbox WHERE id = $1",
                    row["id"],
                )
            )

        await eventually(due, f"outbox row {row['id']} to become due")
        await self.publish_body(
            json.dumps(row["body"]).encode(),
            message_id=str(row["id"]),
            routing_key=row["routing_key"],
            correlation_id=row["correlation_id"],
            headers=row["headers"],
        )
        await self.db.execute(
            "UPDATE outbox SET published_at = now() WHERE id = $1", row["id"]
        )
        return str(row["id"])

    async def dead_letters(self, expected: int) -> list[aio_pika.abc.AbstractMessage]:
        channel = await self.amqp.channel()
        queue = await channel.get_queue(self.names.dead_letter_queue)
        received: list[aio_pika.abc.AbstractMessage] = []

        async def collect() -> bool:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                received.append(message)
            return len(received) >= expected

        await eventually(collect, f"{expected} dead-lettered messages")
        await channel.close()
        return received


@pytest.fixture
async def harness(
    database_url: str,
    amqp_prefix: str,
    db: asyncpg.Connection,
    amqp: AbstractConnection,
) -> AsyncIterator[Harness]:
    await db.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    harness = Harness(database_url, amqp_prefix, db, amqp)
    try:
        yield harness
    finally:
        await harness.stop_all()


async def test_every_query_prepares_against_the_migrated_schema(
    db: asyncpg.Connection,
) -> None:
    dialect = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]
    assert queries.ALL, "no queries registered"
    for name, query in queries.ALL.items():
        sql = query if isinstance(query, str) else str(query.compile(dialect=dialect))
        try:
            await db.prepare(sql)
        except asyncpg.PostgresError as exc:
            pytest.fail(f"query {name} does not prepare: {exc}")


async def test_checksum_task_completes_with_its_result(harness: Harness) -> None:
    await harness.start()
    task_id = await harness.insert_task("checksum", {"text": "hello", "rounds": 3})
    headers = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-request-id": "req-123",
    }

    message_id = await harness.publish(task_id, "checksum", headers=headers)
    task = await harness.wait_status(task_id, "COMPLETED")

    assert task["result"] == checksum_of("hello", 3)
    assert task["attempts"] == 1
    assert task["error"] is None
    assert task["started_at"] is not None
    assert task["completed_at"] is not None

    events = await harness.outbox(task_id)
    assert [event["routing_key"] for event in events] == ["task.completed"]
    assert events[0]["body"] == {
        "task_id": str(task_id),
        "type": "checksum",
        "status": "COMPLETED",
        "attempts": 1,
    }
    # The event continues the message's trace, as a child of the consumer's
    # span for the delivery: same trace id, the consumer's own span id.
    follow_up = events[0]["headers"]
    assert set(follow_up) == {"traceparent", "x-request-id"}
    assert follow_up["x-request-id"] == "req-123"
    version, trace_id, span_id, flags = follow_up["traceparent"].split("-")
    assert (version, trace_id, flags) == (
        "00",
        "0af7651916cd43dd8448eb211c80319c",
        "01",
    )
    assert span_id != "b7ad6b7169203331" and len(span_id) == 16
    assert await harness.inbox_count(message_id) == 1


async def test_redelivered_message_changes_nothing(harness: Harness) -> None:
    await harness.start(consumer_prefetch=1)
    task_id = await harness.insert_task("checksum", {"text": "once"})
    message_id = await harness.publish(task_id, "checksum")
    before = await harness.wait_status(task_id, "COMPLETED")

    await harness.publish(task_id, "checksum", message_id=message_id)
    await harness.sentinel()

    after = await harness.task(task_id)
    assert dict(after) == dict(before)
    assert len(await harness.outbox(task_id, "task.completed")) == 1
    assert await harness.inbox_count(message_id) == 1


async def test_redelivery_after_a_scheduled_retry_changes_nothing(
    harness: Harness,
) -> None:
    # The task is not terminal after a failed attempt, so only the inbox can
    # tell that this message's outcome (the retry) is already recorded.
    await harness.start(consumer_prefetch=1, retry_backoff_base_seconds=60.0)
    task_id = await harness.insert_task("fail_times", {"fail_first": 1}, max_attempts=3)
    message_id = await harness.publish(task_id, "fail_times")

    async def retry_scheduled() -> list[asyncpg.Record]:
        return await harness.outbox(task_id, "task.retry")

    await eventually(retry_scheduled, "the retry to be scheduled")
    before = await harness.task(task_id)

    await harness.publish(task_id, "fail_times", message_id=message_id)
    await harness.sentinel()

    assert dict(await harness.task(task_id)) == dict(before)
    assert before["status"] == "PENDING"
    assert before["attempts"] == 1
    assert len(await harness.outbox(task_id)) == 1


async def test_new_message_for_a_finished_task_changes_nothing(
    harness: Harness,
) -> None:
    await harness.start(consumer_prefetch=1)
    task_id = await harness.insert_task(
        "checksum", {"text": "x"}, status="COMPLETED", attempts=1, result={"v": 1}
    )
    before = await harness.task(task_id)

    message_id = await harness.publish(task_id, "checksum")
    await harness.wait_inbox(message_id)
    await harness.sentinel()

    assert dict(await harness.task(task_id)) == dict(before)
    assert await harness.outbox(task_id) == []


async def test_message_for_a_cancelled_task_never_runs_it(harness: Harness) -> None:
    await harness.start()
    task_id = await harness.insert_task("checksum", {"text": "x"}, status="CANCELLED")

    message_id = await harness.publish(task_id, "checksum")
    await harness.wait_inbox(message_id)

    task = await harness.task(task_id)
    assert task["status"] == "CANCELLED"
    assert task["attempts"] == 0
    assert task["started_at"] is None
    assert task["result"] is None
    assert await harness.outbox(task_id) == []


async def test_cancelling_a_running_task_stops_its_handler(harness: Harness) -> None:
    await harness.start()
    task_id = await harness.insert_task("sleep", {"seconds": 60})
    message_id = await harness.publish(task_id, "sleep")
    await harness.wait_status(task_id, "IN_PROGRESS")

    loop = asyncio.get_running_loop()
    cancelled_at = loop.time()
    await harness.db.execute(
        "UPDATE tasks SET status = 'CANCELLED', updated_at = now() WHERE id = $1",
        task_id,
    )
    await harness.wait_inbox(message_id)

    assert loop.time() - cancelled_at < 10
    task = await harness.task(task_id)
    assert task["status"] == "CANCELLED"
    assert task["result"] is None
    assert task["completed_at"] is None
    assert await harness.outbox(task_id) == []


async def test_unprocessable_messages_are_dead_lettered(harness: Harness) -> None:
    await harness.start()
    missing_task = uuid.uuid4()
    unknown_type = await harness.insert_task("checksum", {"text": "x"})

    bad = {
        "not-json": await harness.publish_body(b"{not json", message_id="not-json"),
        "no-fields": await harness.publish_body(b'{"task": 1}', message_id="no-fields"),
        "unknown-type": await harness.publish(
            unknown_type, "no_such_type", message_id="unknown-type"
        ),
        "missing-task": await harness.publish(
            missing_task, "checksum", message_id="missing-task"
        ),
    }
    good = await harness.insert_task("checksum", {"text": "still working"})
    await harness.publish(good, "checksum")

    await harness.wait_status(good, "COMPLETED")
    dead = await harness.dead_letters(len(bad))
    assert sorted(message.message_id or "" for message in dead) == sorted(bad)
    unchanged = await harness.task(unknown_type)
    assert (unchanged["status"], unchanged["attempts"]) == ("PENDING", 0)
    assert await harness.db.fetchval("SELECT count(*) FROM inbox") == 1


async def test_failed_attempts_are_retried_until_one_succeeds(
    harness: Harness,
) -> None:
    await harness.start()
    task_id = await harness.insert_task(
        "fail_times", {"fail_first": 2, "value": "third time"}, max_attempts=3
    )
    headers = {"x-request-id": "req-retry"}
    await harness.publish(task_id, "fail_times", headers=headers)

    trace_ids = set()
    for attempt in (1, 2):

        async def retry_rows(count: int = attempt) -> list[asyncpg.Record]:
            rows = await harness.outbox(task_id, "task.retry")
            return rows if len(rows) == count else []

        row = (await eventually(retry_rows, f"retry after attempt {attempt}"))[-1]
        task = await harness.task(task_id)
        assert task["status"] == "PENDING"
        assert task["attempts"] == attempt
        assert task["error"] == f"RuntimeError: planned failure on attempt {attempt}"

        # Full jitter: not before the failure, not after base * 2**(attempt - 1).
        backoff = timedelta(seconds=0.05 * 2 ** (attempt - 1))
        assert row["created_at"] <= row["available_at"] <= row["created_at"] + backoff
        assert row["body"] == {"task_id": str(task_id), "type": "fail_times"}
        # A message without a trace starts one in the consumer; the retries
        # stay in it.
        assert row["headers"]["x-request-id"] == "req-retry"
        trace_ids.add(row["headers"]["traceparent"].split("-")[1])
        await harness.relay_due(row)

    task = await harness.wait_status(task_id, "COMPLETED")
    assert task["attempts"] == 3
    assert task["result"] == {"value": "third time", "attempt": 3}
    assert len(trace_ids) == 1
    assert task["error"] is None
    assert len(await harness.outbox(task_id, "task.completed")) == 1
    assert len(await harness.outbox(task_id, "task.retry")) == 2


async def test_a_task_out_of_attempts_fails(harness: Harness) -> None:
    await harness.start()
    task_id = await harness.insert_task("always_fail", {}, max_attempts=1)

    await harness.publish(task_id, "always_fail")
    task = await harness.wait_status(task_id, "FAILED")

    assert task["attempts"] == 1
    assert task["error"] == "RuntimeError: this task always fails"
    assert task["completed_at"] is not None
    assert task["result"] is None
    events = await harness.outbox(task_id)
    assert [event["routing_key"] for event in events] == ["task.failed"]
    assert events[0]["body"] == {
        "task_id": str(task_id),
        "type": "always_fail",
        "status": "FAILED",
        "attempts": 1,
    }


async def test_a_non_retryable_error_fails_the_first_attempt(
    harness: Harness,
) -> None:
    await harness.start()
    task_id = await harness.insert_task("non_retryable", {}, max_attempts=5)

    await harness.publish(task_id, "non_retryable")
    task = await harness.wait_status(task_id, "FAILED")

    assert task["attempts"] == 1
    assert task["error"] == "NonRetryableTaskError: this task can never succeed"
    assert [event["routing_key"] for event in await harness.outbox(task_id)] == [
        "task.failed"
    ]


async def test_recorded_effect_happens_once_however_often_delivered(
    harness: Harness,
) -> None:
    await harness.db.execute(LEDGER_TABLE_DDL)
    task_id = await harness.insert_task("ledger", {"amount": 7, "delay": 0.5})

    # Two redeliveries (as if two consumers had lost their connections)
    # arrive together, so both claim the task and run the handler; only the
    # inbox insert can keep them apart.
    message_id = await harness.publish_abandoned(task_id, "ledger", copies=2)
    consumer = await harness.start()
    task = await harness.wait_status(task_id, "COMPLETED")
    await eventually(
        lambda: asyncio.sleep(0, result=consumer.in_flight == 0), "deliveries done"
    )
    assert task["attempts"] == 2, "the two deliveries did not overlap"

    await harness.publish(task_id, "ledger", message_id=message_id)
    await harness.sentinel()
    await eventually(
        lambda: asyncio.sleep(0, result=consumer.in_flight == 0), "deliveries done"
    )

    ledger = await harness.db.fetch("SELECT * FROM test_ledger")
    assert [(row["task_id"], row["amount"]) for row in ledger] == [(task_id, 7)]
    assert len(await harness.outbox(task_id, "task.completed")) == 1
    assert await harness.inbox_count(message_id) == 1


async def test_overlapping_deliveries_of_a_plain_task_complete_it_once(
    harness: Harness,
) -> None:
    task_id = await harness.insert_task("sleep", {"seconds": 0.5})

    # A type without a recorder completes in one statement; the inbox insert
    # inside it is what keeps the second of two overlapping redeliveries from
    # completing it again.
    message_id = await harness.publish_abandoned(task_id, "sleep", copies=2)
    consumer = await harness.start()
    await harness.wait_status(task_id, "COMPLETED")
    await eventually(
        lambda: asyncio.sleep(0, result=consumer.in_flight == 0), "deliveries done"
    )

    task = await harness.task(task_id)
    assert task["attempts"] == 2, "the two deliveries did not overlap"
    events = await harness.outbox(task_id, "task.completed")
    assert len(events) == 1
    assert events[0]["body"]["attempts"] == 2
    assert await harness.inbox_count(message_id) == 1


async def record_completions(
    db: asyncpg.Connection, *deliveries: tuple[uuid.UUID, str]
) -> dict[str, asyncpg.Record]:
    """Run the batched completion for ``(task id, message id)`` pairs; the
    answer rows by message id."""
    rows = await db.fetch(
        queries.RECORD_COMPLETIONS,
        [task_id for task_id, _ in deliveries],
        [message_id for _, message_id in deliveries],
        ["task.created"] * len(deliveries),
        ['{"done": true}'] * len(deliveries),
        [f'{{"task_id": "{task_id}", "attempts": 0}}' for task_id, _ in deliveries],
        ["{}"] * len(deliveries),
        [str(task_id) for task_id, _ in deliveries],
    )
    return {row["message_id"]: row for row in rows}


async def record_completion(
    db: asyncpg.Connection, task_id: uuid.UUID, message_id: str
) -> asyncpg.Record | None:
    return (await record_completions(db, (task_id, message_id))).get(message_id)


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED", "CANCELLED"])
async def test_a_completion_never_overwrites_a_terminal_task(
    harness: Harness, status: str
) -> None:
    task_id = await harness.insert_task("sleep", {"seconds": 0}, status=status)
    before = await harness.task(task_id)

    first = await record_completion(harness.db, task_id, "m-1")
    again = await record_completion(harness.db, task_id, "m-1")

    assert first is not None and again is not None
    assert (first["status"], first["recorded"]) == (status, True)
    assert (again["status"], again["recorded"]) == (status, False)
    assert dict(await harness.task(task_id)) == dict(before)
    assert await harness.outbox(task_id) == []
    assert await harness.inbox_count("m-1") == 1


async def test_a_completion_of_a_running_task_writes_its_event_once(
    harness: Harness,
) -> None:
    task_id = await harness.insert_task(
        "sleep", {"seconds": 0}, status="IN_PROGRESS", attempts=2
    )

    first = await record_completion(harness.db, task_id, "m-1")
    again = await record_completion(harness.db, task_id, "m-1")

    assert first is not None and again is not None
    assert (first["status"], first["recorded"]) == ("IN_PROGRESS", True)
    assert again["recorded"] is False
    task = await harness.task(task_id)
    assert (task["status"], task["result"]) == ("COMPLETED", {"done": True})
    [event] = await harness.outbox(task_id)
    assert event["routing_key"] == "task.completed"
    assert event["body"] == {"task_id": str(task_id), "attempts": 2}


async def test_one_batch_completes_each_task_as_its_own_delivery_would(
    harness: Harness,
) -> None:
    running = await harness.insert_task(
        "sleep", {"seconds": 0}, status="IN_PROGRESS", attempts=1
    )
    cancelled = await harness.insert_task("sleep", {"seconds": 0}, status="CANCELLED")
    already = await harness.insert_task(
        "sleep", {"seconds": 0}, status="IN_PROGRESS", attempts=1
    )
    await record_completion(harness.db, already, "m-already")
    missing = uuid.uuid4()

    answers = await record_completions(
        harness.db,
        (running, "m-running"),
        (cancelled, "m-cancelled"),
        (already, "m-already"),
        (missing, "m-missing"),
    )

    assert {m: (r["status"], r["recorded"]) for m, r in answers.items()} == {
        "m-running": ("IN_PROGRESS", True),
        "m-cancelled": ("CANCELLED", True),
        "m-already": ("COMPLETED", False),
    }
    assert (await harness.task(running))["status"] == "COMPLETED"
    assert (await harness.task(cancelled))["status"] == "CANCELLED"
    assert len(await harness.outbox(running, "task.completed")) == 1
    assert await harness.outbox(cancelled) == []
    assert len(await harness.outbox(already, "task.completed")) == 1
    assert await harness.inbox_count("m-missing") == 0


async def claim_ready(
    db: asyncpg.Connection,
    *deliveries: tuple[uuid.UUID, str],
    redelivered: frozenset[str] = frozenset(),
) -> dict[str, asyncpg.Record]:
    """Run the batched claim; the message ids in ``redelivered`` come as the
    broker's redeliveries, the others as new messages."""
    rows = await db.fetch(
        queries.CLAIM_READY_TASKS,
        [task_id for task_id, _ in deliveries],
        [message_id for _, message_id in deliveries],
        [message_id in redelivered for _, message_id in deliveries],
        REGISTRY.names(),
    )
    return {row["message_id"]: row for row in rows}


async def test_one_batch_claims_only_the_tasks_ready_to_run(harness: Harness) -> None:
    new = await harness.insert_task("sleep", {"seconds": 1}, status="NEW")
    interrupted = await harness.insert_task(
        "sleep", {"seconds": 1}, status="IN_PROGRESS", attempts=1
    )
    running = await harness.insert_task(
        "sleep", {"seconds": 1}, status="IN_PROGRESS", attempts=1
    )
    last_attempt = await harness.insert_task(
        "sleep", {"seconds": 1}, status="IN_PROGRESS", attempts=3, max_attempts=3
    )
    finished = await harness.insert_task("sleep", {"seconds": 1}, status="COMPLETED")
    unknown = await harness.insert_task("no_such_type", {})
    seen = await harness.insert_task("sleep", {"seconds": 1})
    await harness.db.execute(
        "INSERT INTO inbox (message_id, routing_key) VALUES ('m-seen', 'task.created')"
    )

    claimed = await claim_ready(
        harness.db,
        (new, "m-new"),
        (interrupted, "m-interrupted"),
        (running, "m-copy"),
        (last_attempt, "m-last"),
        (finished, "m-finished"),
        (unknown, "m-unknown"),
        (seen, "m-seen"),
        (uuid.uuid4(), "m-missing"),
        redelivered=frozenset({"m-interrupted", "m-last"}),
    )

    assert {m: r["attempts"] for m, r in claimed.items()} == {
        "m-new": 1,
        "m-interrupted": 2,
    }
    assert claimed["m-new"]["payload"] == {"seconds": 1}
    for task_id in (new, interrupted):
        assert (await harness.task(task_id))["status"] == "IN_PROGRESS"
    # A new message for a running task is a second copy, not a takeover.
    assert (await harness.task(running))["attempts"] == 1
    assert (await harness.task(last_attempt))["attempts"] == 3
    assert (await harness.task(seen))["status"] == "PENDING"


async def test_a_completion_of_a_missing_task_records_nothing(
    harness: Harness,
) -> None:
    assert await record_completion(harness.db, uuid.uuid4(), "m-1") is None
    assert await harness.inbox_count("m-1") == 0


async def test_database_outage_requeues_the_message(harness: Harness) -> None:
    parts = urlsplit(harness.database_url)
    unreachable = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:9"))
    broken = await harness.start(database_url=unreachable)
    task_id = await harness.insert_task("checksum", {"text": "outage"})

    await harness.publish(task_id, "checksum")
    await eventually(
        lambda: asyncio.sleep(0, result=broken.in_flight == 1), "the delivery"
    )
    await harness.stop()

    # The broker requeues a closed channel's unsettled messages asynchronously.
    channel = await harness.amqp.channel()

    async def requeued() -> bool:
        queue = await channel.declare_queue(harness.names.tasks_queue, passive=True)
        return queue.declaration_result.message_count == 1

    await eventually(requeued, "the message back in the work queue", within=5)
    await channel.close()

    await harness.start()
    task = await harness.wait_status(task_id, "COMPLETED")
    assert task["attempts"] == 1


async def test_shutdown_hands_unfinished_work_back_for_redelivery(
    harness: Harness,
) -> None:
    await harness.start(consumer_shutdown_grace_seconds=0.2)
    task_id = await harness.insert_task("sleep", {"seconds": 60})
    await harness.publish(task_id, "sleep")
    await harness.wait_status(task_id, "IN_PROGRESS")

    await harness.stop()
    # Released, not left claimed: the cut-short attempt does not count.
    released = await harness.task(task_id)
    assert (released["status"], released["attempts"]) == ("PENDING", 0)

    # The payload is read from the row on every delivery, so the redelivered
    # message runs the shortened sleep and finishes the task.
    await harness.db.execute(
        """UPDATE tasks SET payload = '{"seconds": 0}'::jsonb WHERE id = $1""",
        task_id,
    )
    await harness.start()
    task = await harness.wait_status(task_id, "COMPLETED")
    assert task["attempts"] == 1
    assert task["result"] == {"slept_seconds": 0}


async def test_sigterm_drains_and_exits_zero(harness: Harness) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": harness.database_url,
        "AMQP_URL": AMQP_URL,
        "AMQP_PREFIX": harness.prefix,
        "TASK_HANDLER_MODULES": "tests.handlers",
        "CONSUMER_CANCEL_POLL_INTERVAL": "0.1",
        "LOG_JSON": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    events: list[str] = []

    async def read_until(event: str) -> bool:
        while event not in events:
            line = await process.stderr.readline()  # type: ignore[union-attr]
            if not line:
                return False
            try:
                events.append(json.loads(line)["event"])
            except (ValueError, KeyError):
                continue
        return True

    try:
        assert await asyncio.wait_for(read_until("consumer_started"), 20), events
        task_id = await harness.insert_task("sleep", {"seconds": 1})
        await harness.publish(task_id, "sleep")
        await harness.wait_status(task_id, "IN_PROGRESS")

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(read_until("consumer_stopped"), 20), events
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    # The task in flight at SIGTERM was allowed to finish.
    task = await harness.task(task_id)
    assert task["status"] == "COMPLETED"
    assert "task_processed" in events


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "--quiet", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout


async def _queue_depth(queue: str) -> int:
    """Messages in ``queue``, ready and unacknowledged together."""
    out = await asyncio.to_thread(_rabbitmqctl, "list_queues", "name", "messages")
    for line in out.splitlines():
        name, _, count = line.rpartition("\t")
        if name == queue:
            return int(count)
    raise AssertionError(f"queue {queue} not found")


@pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host"
)
async def test_lost_broker_connection_keeps_the_committed_outcome(
    harness: Harness,
) -> None:
    consumer = await harness.start()
    out = await asyncio.to_thread(
        _rabbitmqctl, "list_connections", "pid", "client_properties"
    )
    connection_name = f"{harness.prefix}.consumer"
    pids = [line.split("\t")[0] for line in out.splitlines() if connection_name in line]
    assert len(pids) == 1, out

    task_id = await harness.insert_task("sleep", {"seconds": 4})
    await harness.publish(task_id, "sleep")
    await harness.wait_status(task_id, "IN_PROGRESS")

    # Close the consumer's connection while the handler runs: the outcome
    # commits, its ack cannot be sent, and the broker redelivers the message.
    await asyncio.to_thread(_rabbitmqctl, "close_connection", pids[0], "test")
    assert (await harness.task(task_id))["status"] == "IN_PROGRESS", "closed too late"

    task = await harness.wait_status(task_id, "COMPLETED")

    async def redelivery_acknowledged() -> bool:
        return (
            await _queue_depth(harness.names.tasks_queue) == 0
            and consumer.in_flight == 0
        )

    await eventually(redelivery_acknowledged, "the redelivery's ack", within=30)

    # The redelivery may arrive while the first run is still going and run
    # the handler again; either way one outcome is committed, unchanged.
    after = await harness.task(task_id)
    assert (after["status"], after["result"]) == ("COMPLETED", {"slept_seconds": 4})
    assert after["completed_at"] == task["completed_at"]
    assert len(await harness.outbox(task_id, "task.completed")) == 1
