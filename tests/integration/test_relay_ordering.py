"""One key's rows are claimed one at a time, oldest first, whatever the relays."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from outbox_relay.store import OutboxStore


async def insert(
    db: asyncpg.Connection[Any],
    correlation_id: str | None,
    *,
    available_in: float = 0.0,
    dead: bool = False,
) -> int:
    row_id: int = await db.fetchval(
        """
        INSERT INTO outbox (routing_key, body, correlation_id, available_at, dead_at)
        VALUES ('task.event', '{}', $1,
                now() + make_interval(secs => $2::float8),
                CASE WHEN $3 THEN now() END)
        RETURNING id
        """,
        correlation_id,
        available_in,
        dead,
    )
    return row_id


@pytest.fixture
async def stores(database_url: str) -> Any:
    first = await OutboxStore.open(database_url, "relay-1")
    second = await OutboxStore.open(database_url, "relay-2")
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_only_the_oldest_unpublished_row_of_a_key_is_claimed(
    db: asyncpg.Connection[Any], stores: tuple[OutboxStore, OutboxStore]
) -> None:
    first, second = stores
    a1 = await insert(db, "a")
    a2 = await insert(db, "a")
    a3 = await insert(db, "a")
    b1 = await insert(db, "b")
    loose = [await insert(db, None), await insert(db, None)]

    claimed = [row.id for row in await first.claim(100, 60)]
    assert claimed == sorted([a1, b1, *loose])

    # The head of "a" is leased to the first relay: the second gets nothing
    # of "a" (nor anything else) until it is published.
    assert await second.claim(100, 60) == []

    await first.mark_published([a1, b1])
    assert [row.id for row in await second.claim(100, 60)] == [a2]
    await second.mark_published([a2])
    assert [row.id for row in await first.claim(100, 60)] == [a3]


async def test_a_failed_or_scheduled_head_holds_its_key_back_but_a_parked_one_not(
    db: asyncpg.Connection[Any], stores: tuple[OutboxStore, OutboxStore]
) -> None:
    first, _ = stores
    scheduled = await insert(db, "later", available_in=3600)
    behind_scheduled = await insert(db, "later")
    await insert(db, "parked", dead=True)
    behind_parked = await insert(db, "parked")

    claimed = [row.id for row in await first.claim(100, 60)]

    assert claimed == [behind_parked]
    assert behind_scheduled not in claimed
    # The relay sleeps until the scheduled head is due, not until the row
    # behind it, which looks overdue but cannot be claimed.
    await first.mark_published([behind_parked])
    seconds = await first.seconds_until_next_due()
    assert seconds is not None and 3500 < seconds <= 3600
    assert scheduled not in claimed
