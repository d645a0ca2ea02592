"""Waiting out a database outage without giving up the deliveries in hand.

A delivery whose transaction fails because PostgreSQL is unreachable is not
requeued: every requeue counts towards the work queue's delivery limit, so an
outage of a few seconds would dead-letter perfectly good messages. Instead the
delivery keeps its message un-acked and retries the failed step in-process,
with capped back-off, until the database answers or the consumer shuts down.
On shutdown the message is left unsettled; the broker redelivers it once the
connection closes, and nothing it would have changed was committed.

Every delivery, the cancellation watcher and the stuck-task sweeper report to
one :class:`DatabaseOutage`, so an outage is logged once when it starts
(WARNING) and once when it ends (INFO), however many retries it takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from consumer.errors import DatabaseUnavailableError

logger = structlog.get_logger(__name__)

T = TypeVar("T")

#: First wait before a failed step is tried again; it doubles per failure.
RETRY_BASE_SECONDS = 0.1
#: Longest wait between two tries: how late a delivery notices the return.
RETRY_MAX_SECONDS = 5.0


class DatabaseOutage:
    """Whether PostgreSQL answers, as seen by everything in one consumer.

    ``stopping`` is the consumer's shutdown signal: it ends every retry loop
    at once.
    """

    def __init__(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping
        self._down_since: float | None = None

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def down(self, error: BaseException) -> None:
        """Record a failure; only the first of an outage is logged."""
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        logger.warning("consumer_database_down", error=str(error))

    def up(self) -> None:
        """Record a success; logs the end of an outage."""
        if self._down_since is None:
            return
        down_seconds = time.monotonic() - self._down_since
        self._down_since = None
        logger.info("consumer_database_up", down_seconds=round(down_seconds, 3))

    async def retry(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` until it does not raise ``DatabaseUnavailableError``.

        ``step`` must be one transaction that either commits or leaves no
        trace, so running it again is safe. Once shutdown begins the last
        ``DatabaseUnavailableError`` propagates instead of another wait.
        """
        failures = 0
        while True:
            try:
                result = await step()
            except DatabaseUnavailableError as exc:
                self.down(exc)
                if self._stopping.is_set():
                    raise
                await self._wait(retry_delay(failures))
                failures += 1
                if self._stopping.is_set():
                    raise
                continue
            self.up()
            return result

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


def retry_delay(failures: int) -> float:
    """Seconds before the next try after ``failures`` earlier failed tries.

    Doubling from ``RETRY_BASE_SECONDS`` up to ``RETRY_MAX_SECONDS``, then
    scaled by a random factor between one half and one, so deliveries that
    failed together do not all hit the returning server in the same instant.
    """
    nominal = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2.0 ** min(failures, 32))
    return nominal * (0.5 + 0.5 * random.random())
