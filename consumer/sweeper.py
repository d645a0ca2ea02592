"""Finding tasks that are IN_PROGRESS for good and moving them on.

A task is claimed (IN_PROGRESS) by the delivery that runs it. Normally that
delivery records an outcome, or dies and is redelivered, and the redelivery
finishes the task. A task can still be left behind: its message was
dead-lettered after too many deliveries, or its consumer hangs with the
message un-acked. Nothing would ever touch such a task again.

Each consumer therefore sweeps periodically (an APScheduler interval job):
one statement retries every task that has been IN_PROGRESS longer than its
time limit plus a grace, if it has attempts left, and fails it otherwise (see
:data:`consumer.queries.SWEEP_STUCK_TASKS`). The limit is the task type's
``timeout``, or ``TASK_TIME_LIMIT_SECONDS`` for a type without one; the
consumer cancels a handler at that same limit, so a live attempt is never
swept. Sweeps from several consumers skip each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.ext.asyncio import AsyncEngine

from consumer import queries
from consumer.errors import is_transient_database_error
from consumer.outage import DatabaseOutage
from service.registry import HandlerRegistry

logger = structlog.get_logger(__name__)

#: Most tasks one sweep moves on; a larger backlog takes several sweeps.
SWEEP_BATCH_SIZE = 1000

#: How long shutdown waits for a sweep in progress to finish.
SWEEP_STOP_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class SweptTask:
    """A stuck task after a sweep: PENDING (retried) or FAILED."""

    id: str
    type: str
    status: str
    attempts: int


class StuckTaskSweeper:
    """Retries or fails stuck tasks, every ``interval`` seconds once started."""

    def __init__(
        self,
        engine: AsyncEngine,
        registry: HandlerRegistry,
        outage: DatabaseOutage,
        *,
        default_limit: float,
        grace: float,
        interval: float,
    ) -> None:
        self._engine = engine
        self._outage = outage
        self._default_limit = default_limit
        self._grace = grace
        self._interval = interval
        limited = [task_type for task_type in registry if task_type.timeout is not None]
        self._type_names = [task_type.name for task_type in limited]
        self._type_limits = [float(task_type.timeout or 0) for task_type in limited]
        self._scheduler: AsyncIOScheduler | None = None
        self._sweeping: asyncio.Task[object] | None = None

    async def sweep(self) -> list[SweptTask]:
        """Run one sweep; its statement commits on its own."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                queries.SWEEP_STUCK_TASKS,
                {
                    "type_names": self._type_names,
                    "type_limits": self._type_limits,
                    "default_limit": self._default_limit,
                    "grace": self._grace,
                    "batch_size": SWEEP_BATCH_SIZE,
                },
            )
            rows = result.all()
        return [
            SweptTask(
                id=str(row.id), type=row.type, status=row.status, attempts=row.attempts
            )
            for row in rows
        ]

    def start(self) -> None:
        """Sweep every ``interval`` seconds, the first time one interval from now.

        Not at once: a consumer that starts after a crash is about to receive
        the redeliveries of the messages it died with, and each redelivery
        finishes its task. Sweeping first would retry those tasks a second
        time through the outbox (harmless, but a wasted attempt).
        """
        scheduler = AsyncIOScheduler()
        scheduler.add_job(
            self._scheduled_sweep,
            "interval",
            seconds=self._interval,
            id="stuck-task-sweep",
            # A sweep that overran its interval is not queued up behind
            # itself: one sweep at a time, and missed ones collapse into one.
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC) + timedelta(seconds=self._interval),
        )
        scheduler.start()
        self._scheduler = scheduler

    async def stop(self) -> None:
        """Stop scheduling; a sweep in progress gets a moment to commit."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        sweeping = self._sweeping
        if sweeping is not None and not sweeping.done():
            # Cancelling rolls the statement back, which is harmless: the
            # next sweep, here or in another consumer, does the same work.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({sweeping}, timeout=SWEEP_STOP_SECONDS)

    async def _scheduled_sweep(self) -> None:
        """One sweep as the scheduler runs it: errors are logged, never raised."""
        current = asyncio.current_task()
        if current is not None:
            current.set_name("consumer-stuck-task-sweep")
            self._sweeping = current

        try:
            swept = await self.sweep()
        except Exception as exc:
            if is_transient_database_error(exc):
                # Logged once per outage; the next sweep tries again.
                self._outage.down(exc)
            else:
                logger.exception("stuck_task_sweep_failed")
            return

        self._outage.up()
        for task in swept:
            log = logger.error if task.status == "FAILED" else logger.warning
            log(
                "stuck_task_swept",
                task_id=task.id,
                task_type=task.type,
                status=task.status,
                attempts=task.attempts,
            )
