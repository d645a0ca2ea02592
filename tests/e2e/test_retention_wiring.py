"""The relay cleans the outbox and the consumer the inbox, on their schedule."""

from __future__ import annotations

import asyncpg
import pytest

from tests.support.processes import ProcessGroup
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


async def test_relay_and_consumer_run_their_retention_jobs(
    processes: ProcessGroup, db: asyncpg.Connection
) -> None:
    await db.execute(
        """
        INSERT INTO outbox (routing_key, body, created_at, available_at,
                            published_at, dead_at)
        SELECT 'task.created', '{}', now() - interval '3 hours', a, p, d
          FROM (VALUES
                  (now() - interval '3 hours', now() - interval '2 hours', NULL),
                  (now() - interval '3 hours', now() - interval '10 minutes', NULL),
                  (now() + interval '1 day', NULL, NULL),
                  (now() - interval '3 hours', NULL, now() - interval '2 hours')
               ) AS kinds(a, p, d),
               generate_series(1, 5)
        """
    )
    await db.execute(
        """
        INSERT INTO inbox (message_id, routing_key, processed_at)
        SELECT 'm-' || i, 'task.created',
               now() - CASE WHEN i <= 6 THEN interval '2 hours'
                            ELSE interval '10 minutes' END
          FROM generate_series(1, 8) AS i
        """
    )
    retention = {"RETENTION_INTERVAL_SECONDS": "0.3"}
    processes.start("relay", OUTBOX_RETENTION_HOURS="1", **retention)
    processes.start("consumer", INBOX_RETENTION_HOURS="1", **retention)

    async def cleaned() -> bool:
        outbox = await db.fetchval("SELECT count(*) FROM outbox")
        inbox = await db.fetchval("SELECT count(*) FROM inbox")
        return bool(outbox == 15 and inbox == 2)

    await eventually(cleaned, 30, "both retention jobs to run")

    left = await db.fetchrow(
        """
        SELECT count(*) FILTER (WHERE published_at IS NOT NULL) AS published,
               count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL)
                   AS pending,
               count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead
          FROM outbox
        """
    )
    assert dict(left) == {"published": 5, "pending": 5, "dead": 5}
    assert await db.fetchval(
        "SELECT bool_and(processed_at > now() - interval '1 hour') FROM inbox"
    )
    for name, job in (("relay", "outbox"), ("consumer", "inbox")):
        deleted = [
            event["deleted"]
            for event in processes.log_events(name)
            if event.get("event") == "retention_done" and event.get("job") == job
        ]
        assert sum(deleted) == (5 if job == "outbox" else 6), (name, deleted)
