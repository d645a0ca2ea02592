"""The relay against real PostgreSQL and RabbitMQ.

Each test gets its own migrated database and AMQP prefix, writes outbox rows
with plain SQL and runs the relay in-process (``OutboxRelay.run`` in a task)
or, for the command line and signal handling, as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue
from structlog.testing import capture_logs

from consumer.topology import TopologyNames
from outbox_relay import queries
from outbox_relay.publisher import events_exchange_name
from outbox_relay.relay import OutboxRelay
from outbox_relay.settings import RelaySettings
from outbox_relay.store import OutboxStore
from tests.conftest import AMQP_URL, ROOT
from tests.support.proxy import TcpProxy, free_port

T = TypeVar("T")

#: The tests' queue takes every task event; other routing keys are unroutable.
ROUTED = "task.#"


def relay_settings(
    database_url: str, amqp_prefix: str, **overrides: Any
) -> RelaySettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "amqp_url": AMQP_URL,
        "amqp_prefix": amqp_prefix,
        "relay_poll_interval": 0.2,
        "relay_retry_base_seconds": 0.05,
        "relay_retry_max_seconds": 0.2,
        "relay_name": f"test-relay-{secrets.token_hex(3)}",
    }
    values.update(overrides)
    return RelaySettings(**values)


@dataclass
class RunningRelay:
    relay: OutboxRelay
    task: asyncio.Task[None]


@asynccontextmanager
async def running_relay(settings: RelaySettings) -> AsyncIterator[RunningRelay]:
    """The relay running in a task; stopped through its event on exit."""
    stop = asyncio.Event()
    relay = OutboxRelay(settings)
    task = asyncio.create_task(relay.run(stop), name=f"relay {settings.relay_name}")
    try:
        yield RunningRelay(relay, task)
    finally:
        stop.set()
        # Re-raises whatever ended the relay, so a crash fails the test.
        await asyncio.wait_for(task, timeout=15)


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, within: float = 10.0, what: str
) -> T:
    """Poll ``check`` until it returns something truthy, failing after ``within``."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)


async def insert_row(
    db: asyncpg.Connection[Any],
    routing_key: str = "task.created",
    *,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    correlation_id: str | None = None,
    available_in: float = 0.0,
) -> int:
    row_id: int = await db.fetchval(
        """
        INSERT INTO outbox (routing_key, body, headers, correlation_id, available_at)
        VALUES ($1, $2::jsonb, $3::jsonb, $4, now() + make_interval(secs => $5))
        RETURNING id
        """,
        routing_key,
        json.dumps(body if body is not None else {"n": 1}),
        json.dumps(headers or {}),
        correlation_id,
        available_in,
    )
    return row_id


async def outbox_row(db: asyncpg.Connection[Any], row_id: int) -> asyncpg.Record:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT * FROM outbox WHERE id = $1", row_id
    )
    assert row is not None
    return row


async def published(db: asyncpg.Connection[Any], *row_ids: int) -> bool:
    count = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE id = ANY($1) AND published_at IS NOT NULL",
        list(row_ids),
    )
    return bool(count == len(row_ids))


async def drain(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    """Every message in ``queue`` right now (confirmed messages are all there)."""
    messages = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        messages.append(message)
    return messages


async def listen_backends(db: asyncpg.Connection[Any]) -> list[int]:
    rows = await db.fetch(
        """
        SELECT pid FROM pg_stat_activity
         WHERE datname = current_database()
           AND application_name LIKE 'outbox_relay listen %'
        """
    )
    return [row["pid"] for row in rows]


@pytest.fixture
async def tasks_queue(amqp: AbstractConnection, amqp_prefix: str) -> AbstractQueue:
    """``{prefix}.tasks`` bound to the events exchange for every ``task.*`` key."""
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        events_exchange_name(amqp_prefix), aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        TopologyNames.for_prefix(amqp_prefix).tasks_queue, durable=True
    )
    await queue.bind(exchange, ROUTED)
    return queue


async def test_claim_reads_the_pending_index(db: asyncpg.Connection[Any]) -> None:
    await db.execute(
        """
        INSERT INTO outbox (routing_key, body, published_at)
        SELECT 'task.created', '{}'::jsonb, now() FROM generate_series(1, 5000)
        """
    )
    for _ in range(20):
        await insert_row(db)
    await db.execute("ANALYZE outbox")

    plan = await db.fetch("EXPLAIN " + queries.CLAIM_BATCH, 60.0, "explain", 10)

    assert "ix_outbox_pending" in "\n".join(row[0] for row in plan)


async def test_row_is_published_with_its_properties_and_its_task_moves_on(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    task_id = uuid.uuid4()
    await db.execute(
        """
        INSERT INTO tasks (id, title, type, payload, priority, status, max_attempts)
        VALUES ($1, 'relay test', 'checksum', '{}'::jsonb, 'MEDIUM', 'NEW', 3)
        """,
        task_id,
    )
    headers = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "x-request-id": "req-123",
    }
    body = {"task_id": str(task_id), "title": "relay test"}
    row_id = await insert_row(
        db, "task.created", body=body, headers=headers, correlation_id=str(task_id)
    )
    row = await outbox_row(db, row_id)

    async with running_relay(relay_settings(database_url, amqp_prefix)):
        await eventually(lambda: published(db, row_id), what="row marked published")

    [message] = await drain(tasks_queue)
    assert message.message_id == str(row_id)
    assert message.correlation_id == str(task_id)
    assert message.type == "task.created"
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers == headers
    assert json.loads(message.body) == body
    assert message.timestamp is not None
    assert int(message.timestamp.timestamp()) == int(row["created_at"].timestamp())

    after = await outbox_row(db, row_id)
    assert after["claimed_by"] is None
    assert after["attempts"] == 0
    status = await db.fetchval("SELECT status FROM tasks WHERE id = $1", task_id)
    assert status == "PENDING"


async def test_unroutable_row_is_retried_then_parked_while_others_flow(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    settings = relay_settings(database_url, amqp_prefix, relay_max_attempts=3)
    lost_id = await insert_row(db, "nobody.listens")

    with capture_logs() as logs:
        async with running_relay(settings):

            async def attempted() -> asyncpg.Record | None:
                row = await outbox_row(db, lost_id)
                return row if row["attempts"] >= 1 else None

            first_failure = await eventually(attempted, what="a failed attempt")
            assert first_failure["published_at"] is None
            assert "unroutable" in first_failure["last_error"]
            assert "NO_ROUTE" in first_failure["last_error"]

            async def parked() -> asyncpg.Record | None:
                row = await outbox_row(db, lost_id)
                return row if row["dead_at"] is not None else None

            dead = await eventually(parked, what="the row parked")
            assert dead["attempts"] == 3
            assert dead["published_at"] is None

            routed_id = await insert_row(db, "task.created")
            await eventually(lambda: published(db, routed_id), what="next row")

    assert [m.message_id for m in await drain(tasks_queue)] == [str(routed_id)]
    assert (await outbox_row(db, lost_id))["attempts"] == 3
    failed = [e for e in logs if e["event"] == "outbox_publish_failed"]
    assert [e["id"] for e in failed] == [lost_id] * 3
    assert all(e["log_level"] == "warning" for e in failed)
    dead_logs = [e for e in logs if e["event"] == "outbox_row_dead"]
    assert len(dead_logs) == 1
    assert dead_logs[0]["id"] == lost_id
    assert dead_logs[0]["log_level"] == "error"


async def test_notify_wakes_an_idle_relay(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    settings = relay_settings(database_url, amqp_prefix, relay_poll_interval=60.0)

    async with running_relay(settings):
        await eventually(lambda: listen_backends(db), what="relay listening")
        # Each insert after the relay went idle can only be noticed through
        # its notification: the next poll is a minute away.
        for _ in range(2):
            row_id = await insert_row(db)
            await eventually(partial(published, db, row_id), what="woken by NOTIFY")


async def test_polling_publishes_when_notifications_are_gone(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    settings = relay_settings(database_url, amqp_prefix, relay_poll_interval=0.5)

    async with running_relay(settings) as running:
        [listener] = await eventually(
            lambda: listen_backends(db), what="relay listening"
        )
        await db.execute("DROP TRIGGER outbox_notify ON outbox")
        await db.execute("SELECT pg_terminate_backend($1)", listener)

        row_ids = [await insert_row(db) for _ in range(3)]
        await eventually(lambda: published(db, *row_ids), what="published by polling")

        async def relistening() -> bool:
            pids = await listen_backends(db)
            return bool(pids) and listener not in pids

        await eventually(relistening, what="LISTEN connection re-established")
        assert not running.task.done()

    assert len(await drain(tasks_queue)) == 3


async def test_two_relays_publish_each_row_exactly_once(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    row_ids = [
        row["id"]
        for row in await db.fetch(
            """
            INSERT INTO outbox (routing_key, body, correlation_id)
            SELECT 'task.created', jsonb_build_object('n', n), n::text
              FROM generate_series(1, 500) AS n
            RETURNING id
            """
        )
    ]

    async def all_published() -> bool:
        unpublished = await db.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )
        return bool(unpublished == 0)

    first = relay_settings(database_url, amqp_prefix, relay_batch_size=50)
    second = relay_settings(database_url, amqp_prefix, relay_batch_size=50)
    async with running_relay(first), running_relay(second):
        await eventually(all_published, within=30, what="every row published")

    message_ids = [str(message.message_id) for message in await drain(tasks_queue)]
    assert len(message_ids) == 500
    assert sorted(message_ids, key=int) == [str(row_id) for row_id in row_ids]
    assert await db.fetchval("SELECT max(attempts) FROM outbox") == 0


async def test_row_is_not_published_before_it_is_due(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    now_id = await insert_row(db)
    later_id = await insert_row(db, available_in=1.5)
    settings = relay_settings(database_url, amqp_prefix, relay_poll_interval=60.0)

    async with running_relay(settings):
        await eventually(lambda: published(db, now_id), what="the due row")
        assert (await outbox_row(db, later_id))["published_at"] is None
        # The poll is a minute away: only the relay's own look at the next
        # due time can publish this row promptly.
        await eventually(lambda: published(db, later_id), what="the scheduled row")

    later = await outbox_row(db, later_id)
    first_due = later["created_at"].timestamp() + 1.5
    assert later["published_at"].timestamp() >= first_due
    assert [m.message_id for m in await drain(tasks_queue)] == [
        str(now_id),
        str(later_id),
    ]


async def test_status_command_reports_the_lag(
    db: asyncpg.Connection[Any], database_url: str
) -> None:
    await db.execute(
        """
        INSERT INTO outbox (routing_key, body, created_at, available_at,
                            published_at, dead_at)
        VALUES ('task.created', '{}', now() - interval '1 hour',
                now() - interval '1 hour', NULL, NULL),
               ('task.created', '{}', now(), now(), NULL, NULL),
               ('task.created', '{}', now(), now(), NULL, NULL),
               ('task.completed', '{}', now(), now() + interval '1 hour',
                NULL, NULL),
               ('task.failed', '{}', now(), now(), NULL, now()),
               ('task.failed', '{}', now(), now(), NULL, now()),
               ('task.created', '{}', now(), now(), now(), NULL),
               ('task.created', '{}', now(), now(), now(), NULL),
               ('task.created', '{}', now(), now(), now(), NULL),
               ('task.created', '{}', now(), now(), now(), NULL),
               ('task.created', '{}', now(), now(),
                now() - interval '2 minutes', NULL)
        """
    )

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox_relay",
        "status",
        "--json",
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, stderr.decode()

    lag = json.loads(stdout)
    assert lag["pending"] == 4
    assert lag["dead"] == 2
    assert lag["published_last_minute"] == 4
    by_key = {key["routing_key"]: key for key in lag["routing_keys"]}
    assert set(by_key) == {"task.completed", "task.created"}
    assert by_key["task.created"]["pending"] == 3
    assert by_key["task.created"]["due"] == 3
    assert 3600 <= by_key["task.created"]["oldest_age_seconds"] < 3700
    assert by_key["task.completed"]["pending"] == 1
    assert by_key["task.completed"]["due"] == 0


async def test_the_due_gauge_ignores_rows_scheduled_for_later(
    db: asyncpg.Connection[Any], database_url: str
) -> None:
    await db.execute(
        """
        INSERT INTO outbox (routing_key, body, created_at, available_at)
        VALUES ('task.created', '{}', now() - interval '1 hour',
                now() + interval '1 day'),
               ('task.created', '{}', now() - interval '10 minutes',
                now() - interval '5 minutes')
        """
    )
    store = await OutboxStore.open(database_url, "gauge-test")
    try:
        summary = await store.pending_summary()
    finally:
        await store.close()

    assert summary.pending == 2
    assert 3600 <= summary.oldest_age_seconds < 3700
    assert 300 <= summary.longest_due_seconds < 400


async def test_a_row_held_behind_a_scheduled_row_of_its_key_is_not_due(
    db: asyncpg.Connection[Any], database_url: str
) -> None:
    # A task scheduled for tomorrow and cancelled ten minutes ago: its
    # cancellation waits for the creation, which no relay may publish yet.
    await db.execute(
        """
        INSERT INTO outbox (routing_key, body, correlation_id, created_at,
                            available_at)
        VALUES ('task.created', '{}', 'k', now() - interval '1 hour',
                now() + interval '1 day'),
               ('task.cancelled', '{}', 'k', now() - interval '10 minutes',
                now() - interval '10 minutes')
        """
    )
    store = await OutboxStore.open(database_url, "gauge-test")
    try:
        held = await store.pending_summary()
        # Once the creation is due, it is what has waited.
        await db.execute(
            "UPDATE outbox SET available_at = now() - interval '2 minutes'"
            " WHERE routing_key = 'task.created'"
        )
        released = await store.pending_summary()
    finally:
        await store.close()
    lag = {
        row["routing_key"]: row["due"]
        for row in await db.fetch("SELECT routing_key, due FROM outbox_lag")
    }

    assert held.pending == 2
    assert held.longest_due_seconds == 0
    assert 120 <= released.longest_due_seconds < 200
    assert lag == {"task.created": 1, "task.cancelled": 0}


async def test_sigterm_drains_and_exits_zero(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    row_id = await insert_row(db)
    health_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox_relay",
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": database_url,
            "AMQP_URL": AMQP_URL,
            "AMQP_PREFIX": amqp_prefix,
            "RELAY_POLL_INTERVAL": "0.2",
            "LOG_JSON": "true",
            "RELAY_HEALTH_PORT": str(health_port),
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await eventually(lambda: published(db, row_id), within=20, what="published")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{health_port}"
        ) as http:
            ready = await http.get("/health/ready")
        assert ready.status_code == 200

        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 0, stderr.decode()
    events = [json.loads(line) for line in stderr.decode().splitlines() if line]
    names = [event["event"] for event in events]
    assert "outbox_batch_published" in names
    assert "outbox_relay_stopped" in names
    [batch] = [e for e in events if e["event"] == "outbox_batch_published"]
    assert batch["count"] == 1
    assert batch["failed"] == 0
    assert [m.message_id for m in await drain(tasks_queue)] == [str(row_id)]


def _dependency_events(logs: list[MutableMapping[str, Any]], name: str) -> list[str]:
    return [
        event["event"]
        for event in logs
        if event["event"].startswith("outbox_dependency_")
        and event["dependency"] == name
    ]


def reported_down(
    logs: list[MutableMapping[str, Any]], name: str
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return "outbox_dependency_down" in _dependency_events(logs, name)

    return check


def reported_up(
    logs: list[MutableMapping[str, Any]], name: str
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return "outbox_dependency_up" in _dependency_events(logs, name)

    return check


async def test_broker_outage_holds_rows_back_and_is_logged_once(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    broker = TcpProxy(5672)
    await broker.open()
    amqp_url = f"amqp://guest:guest@127.0.0.1:{broker.port}/?reconnect_interval=0.2"
    settings = relay_settings(database_url, amqp_prefix, amqp_url=amqp_url)

    with capture_logs() as logs:
        async with running_relay(settings):
            before_id = await insert_row(db)
            await eventually(lambda: published(db, before_id), what="first row")

            await broker.close()
            await eventually(reported_down(logs, "broker"), what="the relay noticing")
            during_id = await insert_row(db)
            inserted = await outbox_row(db, during_id)
            # Several poll intervals: a relay that claimed while the broker is
            # away would have moved available_at or counted an attempt.
            await asyncio.sleep(1.0)
            held = await outbox_row(db, during_id)
            assert held["available_at"] == inserted["available_at"]
            assert held["attempts"] == 0
            assert held["claimed_by"] is None

            await broker.open()
            await eventually(lambda: published(db, during_id), what="row after outage")

    await broker.close()
    assert _dependency_events(logs, "broker") == [
        "outbox_dependency_down",
        "outbox_dependency_up",
    ]
    ids = [m.message_id for m in await drain(tasks_queue)]
    assert ids == [str(before_id), str(during_id)]


async def test_a_batch_the_broker_does_not_confirm_in_time_is_failed_and_retried(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    broker = TcpProxy(5672)
    await broker.open()
    settings = relay_settings(
        database_url,
        amqp_prefix,
        amqp_url=f"amqp://guest:guest@127.0.0.1:{broker.port}/",
        relay_publish_timeout=0.5,
    )

    try:
        async with running_relay(settings):
            first = await insert_row(db)
            await eventually(lambda: published(db, first), what="first row")

            # The connection stays up, but no confirm comes back.
            broker.stall()
            stalled = await insert_row(db)

            async def attempted() -> asyncpg.Record | None:
                row = await outbox_row(db, stalled)
                return row if row["attempts"] > 0 else None

            row = await eventually(attempted, what="the unconfirmed attempt")
            assert row["published_at"] is None
            assert row["last_error"] == "not confirmed within 0.5 s"

            broker.resume()
            await eventually(lambda: published(db, stalled), what="the retry")
    finally:
        await broker.close()

    # The unconfirmed copy may have reached the queue too: at least once.
    ids = {m.message_id for m in await drain(tasks_queue)}
    assert ids == {str(first), str(stalled)}


async def test_database_outage_is_waited_out_and_logged_once(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    database = TcpProxy(5432)
    await database.open()
    proxied_url = database_url.replace(":5432/", f":{database.port}/")
    settings = relay_settings(proxied_url, amqp_prefix)

    with capture_logs() as logs:
        async with running_relay(settings) as running:
            before_id = await insert_row(db)
            await eventually(lambda: published(db, before_id), what="first row")

            await database.close()
            await eventually(reported_down(logs, "database"), what="the relay noticing")
            during_id = await insert_row(db)
            await database.open()
            await eventually(lambda: published(db, during_id), what="row after outage")
            assert not running.task.done()

    await database.close()
    assert _dependency_events(logs, "database") == [
        "outbox_dependency_down",
        "outbox_dependency_up",
    ]
    ids = [m.message_id for m in await drain(tasks_queue)]
    assert ids == [str(before_id), str(during_id)]


async def test_relay_started_without_broker_and_database_catches_up(
    db: asyncpg.Connection[Any], database_url: str, amqp_prefix: str, tasks_queue: Any
) -> None:
    broker, database = TcpProxy(5672), TcpProxy(5432)
    settings = relay_settings(
        database_url.replace(":5432/", f":{database.port}/"),
        amqp_prefix,
        amqp_url=f"amqp://guest:guest@127.0.0.1:{broker.port}/",
    )
    row_id = await insert_row(db)

    with capture_logs() as logs:
        async with running_relay(settings) as running:
            await eventually(reported_down(logs, "broker"), what="broker reported")
            await eventually(reported_down(logs, "listen"), what="LISTEN reported")
            assert not running.relay.is_ready

            await database.open()
            await broker.open()
            await eventually(lambda: published(db, row_id), what="published")
            await eventually(reported_up(logs, "listen"), what="listening again")

            async def ready() -> bool:
                return running.relay.is_ready

            await eventually(ready, what="relay reporting ready")

    await broker.close()
    await database.close()
    for dependency in ("broker", "listen"):
        assert _dependency_events(logs, dependency) == [
            "outbox_dependency_down",
            "outbox_dependency_up",
        ]


async def test_nacked_row_is_a_failure(
    db: asyncpg.Connection[Any],
    database_url: str,
    amqp_prefix: str,
    amqp: AbstractConnection,
) -> None:
    # A queue that refuses every message makes the broker nack the publish.
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        events_exchange_name(amqp_prefix), aio_pika.ExchangeType.TOPIC, durable=True
    )
    full = await channel.declare_queue(
        TopologyNames.for_prefix(amqp_prefix).task_events_queue,
        durable=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    await full.bind(exchange, "task.completed")
    row_id = await insert_row(db, "task.completed")
    settings = relay_settings(database_url, amqp_prefix, relay_max_attempts=2)

    async def parked() -> asyncpg.Record | None:
        row = await outbox_row(db, row_id)
        return row if row["dead_at"] is not None else None

    async with running_relay(settings):
        dead = await eventually(parked, what="the nacked row parked")

    assert dead["published_at"] is None
    assert dead["attempts"] == 2
    assert "nack" in dead["last_error"]
