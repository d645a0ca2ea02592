"""Deleting old rows in small batches, one replica at a time.

Published outbox rows and old inbox rows are only history; left alone they
grow without bound. A :class:`RetentionJob` deletes them on a schedule
(APScheduler), in batches small enough that each delete is a short
transaction, and takes a PostgreSQL advisory lock first so that only one of
several replicas cleans at a time. The deletes only touch rows that no claim
can want (published or old), and skip rows another transaction has locked,
so they never make the relay wait.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from outbox_relay.config import asyncpg_dsn
from outbox_relay.store import database_errors

logger = structlog.get_logger(__name__)

#: Delete up to ``$2`` outbox rows published more than ``$1`` seconds ago.
DELETE_PUBLISHED_OUTBOX = """
DELETE FROM outbox
 WHERE id IN (
        SELECT id
          FROM outbox
         WHERE published_at < now() - make_interval(secs => $1::float8)
         ORDER BY published_at
         LIMIT $2::int
           FOR UPDATE SKIP LOCKED
       )
"""


@dataclass(frozen=True, kw_only=True)
class RetentionJob:
    """One table's clean-up: ``statement`` takes (retention seconds, batch size)."""

    name: str
    database_url: str
    statement: str
    retention_seconds: float
    #: Key of the advisory lock that makes this job run on one replica only.
    lock_key: int
    batch_size: int = 1000
    #: Pause between batches, leaving room for the work that matters.
    pause_seconds: float = 0.05

    async def run_once(self) -> int | None:
        """Delete everything past retention; the count, or None if not our turn.

        Dying halfway is harmless: the deleted batches are gone, the rest are
        deleted next time, and the advisory lock ends with the connection.
        """
        with database_errors():
            conn = await asyncpg.connect(
                asyncpg_dsn(self.database_url),
                server_settings={"application_name": f"retention {self.name}"},
            )
        try:
            if not await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", self.lock_key
            ):
                logger.debug("retention_skipped", job=self.name)
                return None
            deleted = 0
            while True:
                status = await conn.execute(
                    self.statement, self.retention_seconds, self.batch_size
                )
                count = int(status.split()[-1])
                deleted += count
                if count < self.batch_size:
                    break
                await asyncio.sleep(self.pause_seconds)
            await conn.execute("SELECT pg_advisory_unlock($1)", self.lock_key)
        finally:
            await conn.close()

        logger.info("retention_done", job=self.name, deleted=deleted)
        return deleted

    async def run_logged(self) -> None:
        """``run_once`` for the scheduler: a failed run is logged, not fatal."""
        try:
            await self.run_once()
        except Exception:
            logger.warning("retention_failed", job=self.name, exc_info=True)


def start_scheduler(
    jobs: list[RetentionJob], interval_seconds: float
) -> AsyncIOScheduler:
    """Run every job every ``interval_seconds`` in the running event loop.

    ``max_instances=1`` and ``coalesce`` keep a slow run from piling up
    behind itself. The caller shuts the scheduler down.
    """
    scheduler = AsyncIOScheduler()
    for job in jobs:
        scheduler.add_job(
            job.run_logged,
            IntervalTrigger(seconds=interval_seconds),
            id=job.name,
            max_instances=1,
            coalesce=True,
        )
    scheduler.start()
    return scheduler
