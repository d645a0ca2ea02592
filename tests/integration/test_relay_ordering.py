"""Which rows a claim takes, whatever the relays: one key's rows one at a time,
oldest first, and never a row whose lease another relay still holds."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from outbox_relay import queries
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


async def test_a_leased_row_waits_for_its_lease_to_run_out(
    db: asyncpg.Connection[Any], stores: tuple[OutboxStore, OutboxStore]
) -> None:
    first, second = stores
    row_id = await insert(db, None)

    assert [row.id for row in await first.claim(10, 0.5)] == [row_id]
    assert await second.claim(10, 60) == []
    # The holder settles its own rows; a lease is not a due time to wake for.
    assert await second.seconds_until_next_due() is None

    await asyncio.sleep(0.6)
    # The first relay died, say: once its lease is over the row is taken
    # over, and first in line, since it has been due all along.
    later = await insert(db, None)
    assert [row.id for row in await second.claim(10, 60)] == [row_id, later]
    holder = await db.fetchval("SELECT claimed_by FROM outbox WHERE id = $1", row_id)
    assert holder == "relay-2"


async def test_a_released_row_is_claimable_at_once(
    db: asyncpg.Connection[Any], stores: tuple[OutboxStore, OutboxStore]
) -> None:
    first, second = stores
    row_id = await insert(db, None)
    await first.claim(10, 60)

    await first.release([row_id])

    assert await second.seconds_until_next_due() is not None
    assert [row.id for row in await second.claim(10, 60)] == [row_id]


async def test_concurrent_claims_never_share_a_row(
    db: asyncpg.Connection[Any], database_url: str
) -> None:
    await db.execute(
        """
        INSERT INTO outbox (routing_key, body, correlation_id)
        SELECT 'task.event', '{}', CASE WHEN n % 3 = 0 THEN NULL ELSE n::text END
          FROM generate_series(1, 3000) AS n
        """
    )
    relays = [await OutboxStore.open(database_url, f"relay-{n}") for n in range(4)]
    claimed: list[list[int]] = [[] for _ in relays]

    async def claim_until_empty(number: int) -> None:
        # Each relay releases every other batch, so the others keep meeting
        # rows that were just leased, or just handed back, by someone else.
        store, passes = relays[number], 0
        while rows := await store.claim(25, 600):
            passes += 1
            if passes % 2:
                await store.release([row.id for row in rows])
            else:
                claimed[number] += [row.id for row in rows]

    try:
        await asyncio.gather(*(claim_until_empty(n) for n in range(len(relays))))
    finally:
        for store in relays:
            await store.close()

    kept = [row_id for ids in claimed for row_id in ids]
    assert len(kept) == len(set(kept)) == 3000
    holders = await db.fetch(
        "SELECT claimed_by, count(*) AS n FROM outbox GROUP BY claimed_by"
    )
    assert {row["claimed_by"]: row["n"] for row in holders} == {
        f"relay-{n}": len(ids) for n, ids in enumerate(claimed) if ids
    }


async def test_taking_and_dropping_a_lease_touches_no_index(
    db: asyncpg.Connection[Any],
) -> None:
    await db.execute(
        """
        INSERT INTO outbox (routing_key, body, correlation_id)
        SELECT 'task.event', '{}', n::text FROM generate_series(1, 200) AS n
        """
    )
    async with db.transaction():
        claimed = await db.fetch(queries.CLAIM_BATCH, 60.0, "relay-1", 500)
        updated, hot = await db.fetchrow(
            """
            SELECT pg_stat_get_xact_tuples_updated('outbox'::regclass),
                   pg_stat_get_xact_tuples_hot_updated('outbox'::regclass)
            """
        )

    # HOT updates: each new version stayed on its page and no index gained an
    # entry, so the claim's cost does not grow with the rows published before.
    assert len(claimed) == 200
    assert (updated, hot) == (200, 200)
