"""Retention deletes old published rows only, one replica at a time, relays or not."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import asyncpg

from consumer.retention import DELETE_OLD_INBOX
from consumer.topology import TopologyNames
from outbox_relay.publisher import events_exchange_name
from outbox_relay.retention import DELETE_PUBLISHED_OUTBOX, RetentionJob
from tests.integration.test_relay import relay_settings, running_relay
from tests.support.waiting import eventually

DAY = 86_400.0


def outbox_job(database_url: str, **overrides: Any) -> RetentionJob:
    values: dict[str, Any] = {
        "name": "outbox",
        "database_url": database_url,
        "statement": DELETE_PUBLISHED_OUTBOX,
        "retention_seconds": DAY,
        "lock_key": 4242,
        "batch_size": 7,
        "pause_seconds": 0,
    }
    values.update(overrides)
    return RetentionJob(**values)


async def seed(db: asyncpg.Connection) -> None:
    """30 old published, 5 fresh published, 4 old pending, 3 old dead rows."""
    rows = [
        (30, "now() - interval '3 days'", "now() - interval '3 days'", "NULL"),
        (5, "now() - interval '3 days'", "now() - interval '1 hour'", "NULL"),
        (4, "now() - interval '3 days'", "NULL", "NULL"),
        (3, "now() - interval '3 days'", "NULL", "now() - interval '2 days'"),
    ]
    for count, created, published, dead in rows:
        await db.execute(
            "INSERT INTO outbox (routing_key, body, created_at, published_at, dead_at)"
            f" SELECT 'task.created', '{{}}'::jsonb, {created}, {published}, {dead}"
            f" FROM generate_series(1, {count})"
        )


async def test_only_rows_published_before_the_retention_are_deleted(
    db: asyncpg.Connection, database_url: str
) -> None:
    await seed(db)

    deleted = await outbox_job(database_url).run_once()

    assert deleted == 30
    left = await db.fetchrow(
        """
        SELECT count(*) FILTER (WHERE published_at IS NOT NULL) AS published,
               count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL)
                   AS pending,
               count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead
          FROM outbox
        """
    )
    assert dict(left) == {"published": 5, "pending": 4, "dead": 3}


async def test_a_second_replica_skips_while_one_holds_the_lock(
    db: asyncpg.Connection, database_url: str
) -> None:
    await seed(db)
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock(4242)")

        assert await outbox_job(database_url).run_once() is None
        assert await db.fetchval("SELECT count(*) FROM outbox") == 42
    finally:
        await holder.close()

    assert await outbox_job(database_url).run_once() == 30


async def test_cleanup_never_waits_on_rows_another_transaction_holds(
    db: asyncpg.Connection, database_url: str
) -> None:
    await seed(db)
    holder = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        locked = await holder.fetch(
            "SELECT id FROM outbox WHERE published_at < now() - interval '1 day'"
            " ORDER BY id LIMIT 3 FOR UPDATE"
        )

        deleted = await asyncio.wait_for(outbox_job(database_url).run_once(), 10)

        assert deleted == 27
        await transaction.rollback()
    finally:
        await holder.close()
    remaining = await db.fetch(
        "SELECT id FROM outbox WHERE published_at < now() - interval '1 day'"
    )
    assert sorted(r["id"] for r in remaining) == sorted(r["id"] for r in locked)


async def test_old_inbox_rows_are_deleted(
    db: asyncpg.Connection, database_url: str
) -> None:
    await db.execute(
        "INSERT INTO inbox (message_id, routing_key, processed_at)"
        " SELECT 'old-' || i, 'task.created', now() - interval '40 days'"
        " FROM generate_series(1, 12) AS i"
    )
    await db.execute(
        "INSERT INTO inbox (message_id, routing_key) VALUES ('new', 'task.created')"
    )

    deleted = await outbox_job(
        database_url,
        name="inbox",
        statement=DELETE_OLD_INBOX,
        retention_seconds=30 * DAY,
        lock_key=4243,
    ).run_once()

    assert deleted == 12
    assert await db.fetchval("SELECT message_id FROM inbox") == "new"


async def test_cleanup_while_two_relays_publish_deletes_only_old_published_rows(
    db: asyncpg.Connection,
    database_url: str,
    amqp_prefix: str,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    await seed(db)
    old_published = {
        row["id"]
        for row in await db.fetch(
            "SELECT id FROM outbox WHERE published_at < now() - interval '1 day'"
        )
    }
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        events_exchange_name(amqp_prefix), aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        TopologyNames.for_prefix(amqp_prefix).tasks_queue, durable=True
    )
    await queue.bind(exchange, "task.#")

    async def writer() -> None:
        # New rows keep arriving (some for the same keys) while both clean-up
        # and the relays work on the table.
        for i in range(60):
            await db.execute(
                "INSERT INTO outbox (routing_key, body, correlation_id)"
                " VALUES ('task.created', '{}', $1)",
                f"key-{i % 7}",
            )
            await asyncio.sleep(0.005)

    async with (
        running_relay(relay_settings(database_url, amqp_prefix)),
        running_relay(relay_settings(database_url, amqp_prefix)),
    ):
        writing = asyncio.create_task(writer(), name="test-outbox-writer")
        # Several runs, each in small batches, overlapping the relays.
        deleted = 0
        for _ in range(5):
            deleted += await outbox_job(database_url, batch_size=3).run_once() or 0
        await writing

        async def all_published() -> bool:
            pending = await db.fetchval(
                "SELECT count(*) FROM outbox"
                " WHERE published_at IS NULL AND dead_at IS NULL"
            )
            return bool(pending == 0)

        await eventually(all_published, 30, "every live row to be published")

    assert deleted == len(old_published) == 30
    left = await db.fetchrow(
        """
        SELECT count(*) FILTER (WHERE published_at IS NOT NULL) AS published,
               count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead,
               count(*) FILTER (WHERE id = ANY($1::bigint[])) AS old
          FROM outbox
        """,
        list(old_published),
    )
    # 5 fresh + 4 old pending rows + 60 new rows, all published now.
    assert dict(left) == {"published": 69, "dead": 3, "old": 0}
