"""Noticing that a running task was cancelled, for every running task at once.

The API cancels a task by setting its status to CANCELLED (and writing the
``task.cancelled`` event itself). The consumer learns of it by polling: one
query per interval for all tasks this process runs, so the cost does not grow
with the prefetch. A cancelled handler's context event is set first, so a
cooperative handler can stop cleanly, and its coroutine is cancelled as well.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from consumer import queries
from consumer.errors import is_transient_database_error
from consumer.outage import DatabaseOutage

logger = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Watched:
    task_id: uuid.UUID
    cancelled: asyncio.Event
    handler: asyncio.Task[Any]


class CancellationWatcher:
    """Cancels running handlers whose task became CANCELLED in the database."""

    def __init__(
        self,
        engine: AsyncEngine,
        interval: float,
        outage: DatabaseOutage | None = None,
    ) -> None:
        self._engine = engine
        self._interval = interval
        self._outage = outage
        self._watched: dict[int, _Watched] = {}
        # Keys are per run, not per task id: two deliveries of one task may
        # run at once and each must be cancelled.
        self._keys = itertools.count()

    @contextmanager
    def watch(
        self, task_id: uuid.UUID, cancelled: asyncio.Event, handler: asyncio.Task[Any]
    ) -> Iterator[None]:
        """Watch ``task_id`` while the ``with`` block runs ``handler``."""
        key = next(self._keys)
        self._watched[key] = _Watched(task_id, cancelled, handler)
        try:
            yield
        finally:
            del self._watched[key]

    async def run(self) -> None:
        """Poll until cancelled; a failed poll is logged and tried again."""
        while True:
            await asyncio.sleep(self._interval)
            if not self._watched:
                continue

            try:
                await self.check()
            except Exception as exc:
                # Missing one poll only delays a cancellation; the task is
                # still recorded as CANCELLED when its attempt ends. An outage
                # is reported once, not once per poll.
                if self._outage is not None and is_transient_database_error(exc):
                    self._outage.down(exc)
                else:
                    logger.warning("cancel_watch_failed", error=repr(exc))
            else:
                if self._outage is not None:
                    self._outage.up()

    async def check(self) -> None:
        """Look once for cancelled tasks among the running ones."""
        task_ids = list({watched.task_id for watched in self._watched.values()})
        async with self._engine.connect() as conn:
            result = await conn.execute(queries.CANCELLED_AMONG, {"task_ids": task_ids})
            cancelled = {row.id for row in result}

        if not cancelled:
            return

        for watched in list(self._watched.values()):
            if watched.task_id in cancelled and not watched.cancelled.is_set():
                logger.debug("task_cancel_noticed", task_id=str(watched.task_id))
                watched.cancelled.set()
                watched.handler.cancel()
