"""The operating views and the hot queries stay cheap with many published rows.

One database per module, seeded like a busy week: 200,000 published outbox
rows spread over seven days, 200,000 inbox rows over thirty, and a small
backlog. Every view and every query the relays, the consumers' status and
the retention jobs run is EXPLAINed there: each must reach the outbox (and
the inbox) through the partial or time index meant for it, never by a
sequential scan, so its cost follows the backlog or the recent traffic
rather than the size of the table.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect

from consumer import queries as consumer_queries
from consumer.retention import DELETE_OLD_INBOX
from outbox_relay import queries
from outbox_relay.retention import DELETE_PUBLISHED_OUTBOX
from tests.conftest import _admin_execute, database_url_for

PUBLISHED_ROWS = 200_000
INBOX_ROWS = 200_000


@pytest.fixture(scope="module")
async def busy_db(template_database: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    name = f"ot_plans_{secrets.token_hex(6)}"
    await _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    conn = await asyncpg.connect(database_url_for(name))
    try:
        await conn.execute(
            f"""
            INSERT INTO outbox (routing_key, body, headers, correlation_id,
                                created_at, available_at, published_at)
            SELECT CASE WHEN i % 3 = 0 THEN 'task.completed' ELSE 'task.created' END,
                   jsonb_build_object('task_id', md5(i::text)),
                   jsonb_build_object('x-request-id', md5(i::text)),
                   md5((i / 3)::text),
                   p - interval '50 milliseconds',
                   p - interval '50 milliseconds',
                   p
              FROM generate_series(1, {PUBLISHED_ROWS}) AS i,
                   LATERAL (SELECT now() - interval '7 days' * (i::float8 /
                            {PUBLISHED_ROWS}) AS p) AS t
            """
        )
        # The backlog: due rows, two per key for some keys, scheduled rows,
        # rows without a key, and a few parked ones.
        await conn.execute(
            """
            INSERT INTO outbox (routing_key, body, correlation_id, available_at,
                                dead_at, attempts, last_error)
            SELECT 'task.created', '{}', 'pending-' || (i % 40),
                   now() + CASE WHEN i % 10 = 0 THEN interval '1 hour'
                                ELSE interval '0' END,
                   CASE WHEN i % 25 = 0 THEN now() END,
                   CASE WHEN i % 25 = 0 THEN 25 ELSE 0 END,
                   CASE WHEN i % 25 = 0 THEN 'unroutable' END
              FROM generate_series(1, 100) AS i
            """
        )
        await conn.execute(
            "INSERT INTO outbox (routing_key, body) SELECT 'loose', '{}'"
            " FROM generate_series(1, 10)"
        )
        await conn.execute(
            f"""
            INSERT INTO inbox (message_id, routing_key, processed_at)
            SELECT i::text, 'task.created',
                   now() - interval '30 days' * (i::float8 / {INBOX_ROWS})
              FROM generate_series(1, {INBOX_ROWS}) AS i
            """
        )
        await conn.execute("ANALYZE outbox")
        await conn.execute("ANALYZE inbox")
        yield conn
    finally:
        await conn.close()
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _consumer_sql(name: str) -> str:
    dialect = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]
    query = consumer_queries.ALL[name]
    return query if isinstance(query, str) else str(query.compile(dialect=dialect))


#: (statement, its parameters, the indexes its plan must use; ``a|b`` for
#: either of two, where both are cheap and the planner may pick either).
PLANS: dict[str, tuple[str, tuple[Any, ...], set[str]]] = {
    "view outbox_lag": (
        "SELECT * FROM outbox_lag",
        (),
        {"ix_outbox_pending", "ix_outbox_pending_correlation"},
    ),
    "view outbox_dead": ("SELECT * FROM outbox_dead", (), {"ix_outbox_dead_at"}),
    "view outbox_publish_latency": (
        "SELECT * FROM outbox_publish_latency",
        (),
        {"ix_outbox_published_at"},
    ),
    "view inbox_throughput": (
        "SELECT * FROM inbox_throughput",
        (),
        {"ix_inbox_processed_at"},
    ),
    "CLAIM_BATCH": (queries.CLAIM_BATCH, (60.0, "explain", 256), {"ix_outbox_pending"}),
    "NEXT_AVAILABLE_AT": (queries.NEXT_AVAILABLE_AT, (), {"ix_outbox_pending"}),
    "PENDING_SUMMARY": (
        queries.PENDING_SUMMARY,
        (),
        {"ix_outbox_pending", "ix_outbox_pending_correlation"},
    ),
    "LAG_BY_ROUTING_KEY": (queries.LAG_BY_ROUTING_KEY, (), {"ix_outbox_pending"}),
    "LAG_TOTALS": (
        queries.LAG_TOTALS,
        (),
        {"ix_outbox_dead_at", "ix_outbox_published_at"},
    ),
    "RECENT_DEAD": (queries.RECENT_DEAD, (10,), {"ix_outbox_dead_at"}),
    "PUBLISH_LATENCY": (queries.PUBLISH_LATENCY, (), {"ix_outbox_published_at"}),
    "MARK_PUBLISHED": (
        queries.MARK_PUBLISHED,
        ([1, 2, 3],),
        {"pk_outbox|ix_outbox_pending"},
    ),
    "MARK_FAILED": (
        queries.MARK_FAILED,
        ([1, 2], ["e", "e"], [1.0, 1.0], "explain", 25),
        {"pk_outbox|ix_outbox_pending"},
    ),
    "RELEASE": (
        queries.RELEASE,
        ([1, 2, 3], "explain"),
        {"pk_outbox|ix_outbox_pending"},
    ),
    "REPLAY_DEAD all": (queries.REPLAY_DEAD, (None,), {"ix_outbox_dead_at"}),
    "REPLAY_DEAD some": (
        queries.REPLAY_DEAD,
        ([1, 2],),
        {"pk_outbox|ix_outbox_dead_at"},
    ),
    "DELETE_PUBLISHED_OUTBOX": (
        DELETE_PUBLISHED_OUTBOX,
        (168 * 3600.0, 1000),
        {"ix_outbox_published_at"},
    ),
    "DELETE_OLD_INBOX": (
        DELETE_OLD_INBOX,
        (720 * 3600.0, 1000),
        {"ix_inbox_processed_at"},
    ),
    "consumer INBOX_THROUGHPUT": (
        _consumer_sql("INBOX_THROUGHPUT"),
        (),
        {"ix_inbox_processed_at"},
    ),
}


async def explain(conn: asyncpg.Connection[Any], statement: str, *args: Any) -> str:
    """The plan of ``statement``, planned but not run."""
    return "\n".join(row[0] for row in await conn.fetch("EXPLAIN " + statement, *args))


#: The claim at the relay's default batch size, for the tests of a backlog.
BACKLOG_PLANS = {
    "CLAIM_BATCH": (queries.CLAIM_BATCH, (60.0, "explain", 1024)),
    "NEXT_AVAILABLE_AT": (queries.NEXT_AVAILABLE_AT, ()),
}


@pytest.mark.parametrize("name", sorted(PLANS))
async def test_reads_its_index_and_never_scans_the_table(
    busy_db: asyncpg.Connection[Any], name: str
) -> None:
    statement, args, indexes = PLANS[name]

    # EXPLAIN without ANALYZE: the claim and the deletes are only planned.
    plan = await explain(busy_db, statement, *args)

    assert "Seq Scan on outbox" not in plan, plan
    assert "Seq Scan on inbox" not in plan, plan
    for index in indexes:
        assert any(name in plan for name in index.split("|")), plan


@pytest.mark.parametrize("name", ["CLAIM_BATCH", "NEXT_AVAILABLE_AT"])
async def test_with_a_large_backlog_the_order_check_probes_its_index(
    busy_db: asyncpg.Connection[Any], name: str
) -> None:
    statement, args, _ = PLANS[name]
    transaction = busy_db.transaction()
    await transaction.start()
    try:
        # An outage's worth of backlog; rolled back with its statistics.
        await busy_db.execute(
            "INSERT INTO outbox (routing_key, body, correlation_id)"
            " SELECT 'task.created', '{}', md5((i % 10000)::text)"
            " FROM generate_series(1, 30000) AS i"
        )
        await busy_db.execute("ANALYZE outbox")

        plan = await explain(busy_db, statement, *args)
    finally:
        await transaction.rollback()

    assert "Seq Scan on outbox" not in plan, plan
    assert "ix_outbox_pending " in plan, plan
    assert "ix_outbox_pending_correlation" in plan, plan


async def test_the_views_answer_from_the_seeded_rows(
    busy_db: asyncpg.Connection[Any],
) -> None:
    lag = await busy_db.fetch("SELECT * FROM outbox_lag ORDER BY routing_key")
    assert [(row["routing_key"], row["pending"]) for row in lag] == [
        ("loose", 10),
        ("task.created", 96),
    ]
    # Due means claimable now: the oldest live row of each of the 40 keys,
    # unless that row is scheduled for later (keys 0, 10, 20 and 30).
    assert lag[1]["due"] == 36
    assert await busy_db.fetchval("SELECT count(*) FROM outbox_dead") == 4

    latency = await busy_db.fetch("SELECT * FROM outbox_publish_latency")
    assert [row["window"] for row in latency] == ["1 minute", "5 minutes", "1 hour"]
    hour = latency[2]
    # About 200,000 / (7 * 24) rows fall in the last hour.
    assert 1000 < hour["published"] < 1400
    assert hour["p50_seconds"] == pytest.approx(0.05, abs=0.001)

    minutes = await busy_db.fetch("SELECT * FROM inbox_throughput")
    assert 55 <= len(minutes) <= 61
    assert sum(row["processed"] for row in minutes) == pytest.approx(
        INBOX_ROWS / (30 * 24), rel=0.05
    )


@pytest.mark.parametrize("name", sorted(BACKLOG_PLANS))
async def test_a_table_of_nothing_but_backlog_is_read_in_due_order(
    db: asyncpg.Connection[Any], name: str
) -> None:
    # No published rows at all, so a sequential scan looks cheap: the claim
    # must still walk the pending index in due order and stop at its limit,
    # not read and sort every pending row.
    await db.execute(
        "INSERT INTO outbox (routing_key, body, correlation_id)"
        " SELECT 'task.created', '{}', md5(i::text)"
        " FROM generate_series(1, 50000) AS i"
    )
    await db.execute("VACUUM ANALYZE outbox")
    statement, args = BACKLOG_PLANS[name]
    plan = await explain(db, statement, *args)

    assert "Seq Scan on outbox" not in plan, plan
    assert "ix_outbox_pending " in plan, plan


@pytest.mark.parametrize("name", sorted(BACKLOG_PLANS))
async def test_with_a_backlog_of_a_few_rows_the_order_check_probes_its_index(
    db: asyncpg.Connection[Any], name: str
) -> None:
    # A history just purged: statistics put the table at a handful of rows,
    # and every path looks cheap. (At this size the planner chooses well in
    # any case; the five-million-row benchmark is where it did not.)
    await db.execute(
        "INSERT INTO outbox (routing_key, body, correlation_id, published_at)"
        " SELECT 'task.created', '{}', md5(i::text), now()"
        " FROM generate_series(1, 100000) AS i"
    )
    await db.execute(
        "INSERT INTO outbox (routing_key, body, correlation_id)"
        " SELECT 'task.created', '{}', md5(i::text)"
        " FROM generate_series(1, 100) AS i"
    )
    await db.execute("DELETE FROM outbox WHERE published_at IS NOT NULL")
    await db.execute("VACUUM ANALYZE outbox")
    statement, args = BACKLOG_PLANS[name]
    plan = await explain(db, statement, *args)

    assert "ix_outbox_pending_correlation" in plan, plan
    assert "pk_outbox" not in plan, plan
