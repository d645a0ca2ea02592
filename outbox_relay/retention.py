"""Deleting old rows in small batches, one replica at a time.

Published outbox rows and old inbox rows are only history; left alone they
grow without bound. A :class:`RetentionJob` deletes them on a schedule
(:class:`RetentionSchedule`, an APScheduler interval job), in batches small
enough that each delete is a short transaction, and takes a PostgreSQL
advisory lock first so that only one of several replicas cleans at a time.
The deletes only touch rows that no claim can want (published or old), and
skip rows another transaction has locked, so they never make the relay wait.

The relay runs the outbox's job (``OUTBOX_RETENTION_HOURS``); the consumer
runs the inbox's (``INBOX_RETENTION_HOURS``, see :mod:`consumer.retention`),
both every ``RETENTION_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from outbox_relay.config import asyncpg_dsn
from outbox_relay.store import (
    CONNECT_TIMEOUT_SECONDS,
    STATEMENT_TIMEOUT_SECONDS,
    database_errors,
)

logger = structlog.get_logger(__name__)

#: Advisory lock keys of the two jobs; any two distinct constants will do, as
#: long as every replica of a deployment uses the same one for the same job.
OUTBOX_RETENTION_LOCK = 7_010_001
INBOX_RETENTION_LOCK = 7_010_002

#: How long stopping waits for a run in progress before cancelling it.
STOP_WAIT_SECONDS = 5.0

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

        Each batch commits on its own. Dying halfway is harmless: the deleted
        batches are gone, the rest are deleted next time, and the advisory
        lock ends with the connection.
        """
        with database_errors():
            conn: asyncpg.Connection[Any] = await asyncpg.connect(
                asyncpg_dsn(self.database_url),
                timeout=CONNECT_TIMEOUT_SECONDS,
                command_timeout=STATEMENT_TIMEOUT_SECONDS,
                server_settings={"application_name": f"retention {self.name}"},
            )
        try:
            with database_errors():
                deleted = await self._delete_all(conn)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

        if deleted is None:
            logger.debug("retention_skipped", job=self.name)
        else:
            logger.info("retention_done", job=self.name, deleted=deleted)
        return deleted

    async def _delete_all(self, conn: asyncpg.Connection[Any]) -> int | None:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.lock_key):
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
        return deleted


class RetentionSchedule:
    """Runs each job every ``interval_seconds`` in the running event loop.

    The first run comes one interval after :meth:`start`, so replicas that
    start together do not all clean at once. A failed run is logged and the
    next one tries again; a run never overlaps the previous run of its job.
    """

    def __init__(self, jobs: list[RetentionJob], interval_seconds: float) -> None:
        self._jobs = jobs
        self._interval = interval_seconds
        self._scheduler: AsyncIOScheduler | None = None
        self._running: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        scheduler = AsyncIOScheduler()
        for job in self._jobs:
            scheduler.add_job(
                self._run,
                IntervalTrigger(seconds=self._interval),
                args=[job],
                id=f"retention-{job.name}",
                # A slow run is not queued up behind itself: one at a time,
                # and missed runs collapse into one.
                max_instances=1,
                coalesce=True,
            )
        scheduler.start()
        self._scheduler = scheduler
        logger.debug(
            "retention_scheduled",
            jobs=[job.name for job in self._jobs],
            interval_seconds=self._interval,
        )

    async def stop(self) -> None:
        """Stop scheduling; a run in progress gets a moment, then is cancelled.

        Cancelling a run is safe: every committed batch stays deleted, the
        batch in flight rolls back.
        """
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        running = set(self._running)
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=STOP_WAIT_SECONDS)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self, job: RetentionJob) -> None:
        """One run as the scheduler calls it: errors are logged, never raised."""
        current = asyncio.current_task()
        if current is not None:
            current.set_name(f"retention-{job.name}")
            self._running.add(current)
        try:
            await job.run_once()
        except Exception:
            logger.warning("retention_failed", job=job.name, exc_info=True)
        finally:
            if current is not None:
                self._running.discard(current)


def retention_schedule(
    *,
    name: str,
    database_url: str,
    statement: str,
    retention_hours: float,
    interval_seconds: float,
    lock_key: int,
) -> RetentionSchedule | None:
    """A schedule for one table's clean-up; None when either setting is 0 (off)."""
    if interval_seconds == 0 or retention_hours == 0:
        return None
    job = RetentionJob(
        name=name,
        database_url=database_url,
        statement=statement,
        retention_seconds=retention_hours * 3600,
        lock_key=lock_key,
    )
    return RetentionSchedule([job], interval_seconds)
