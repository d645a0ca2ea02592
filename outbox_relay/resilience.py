"""Back-off and the up/down bookkeeping of the relay's dependencies.

Nothing here does I/O, so the relay's retry policy and its outage logging can
be tested without a database or a broker.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: Exponents beyond this overflow a float long before any sane cap applies.
_MAX_EXPONENT = 62


def retry_delay(
    attempts: int,
    base: float,
    cap: float,
    *,
    jitter: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after the failure that follows ``attempts`` earlier ones.

    The delay doubles from ``base`` up to ``cap``, then is scaled by a random
    factor between one half and one, so rows or processes that failed together
    do not all come back in the same instant while still waiting at least half
    the nominal time.
    """
    nominal = min(cap, base * 2.0 ** min(max(attempts, 0), _MAX_EXPONENT))
    return nominal * (0.5 + 0.5 * jitter())


class Backoff:
    """Growing delays between attempts to reach a dependency, reset on success."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self._base = base
        self._cap = cap
        self._failures = 0

    def next_delay(self) -> float:
        delay = retry_delay(self._failures, self._base, self._cap)
        self._failures += 1
        return delay

    def reset(self) -> None:
        self._failures = 0


class DependencyHealth:
    """Whether a dependency (database, broker, LISTEN connection) is reachable.

    Loops report every failed attempt with :meth:`down` and every success with
    :meth:`up`, but only the transitions are logged: an outage is one WARNING
    when it starts and one INFO when it ends, however many retries it takes.
    """

    def __init__(self, name: str, backoff: Backoff | None = None) -> None:
        self.name = name
        self._backoff = backoff or Backoff()
        self._down_since: float | None = None

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def down(self, error: BaseException | str) -> float:
        """Record a failed attempt; returns how long to wait before the next."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "outbox_dependency_down", dependency=self.name, error=str(error)
            )
        return self._backoff.next_delay()

    def up(self) -> None:
        """Record a success; logs the recovery if the dependency was down."""
        self._backoff.reset()
        if self._down_since is None:
            return

        down_seconds = time.monotonic() - self._down_since
        self._down_since = None
        log.info(
            "outbox_dependency_up",
            dependency=self.name,
            down_seconds=round(down_seconds, 3),
        )


async def wait_first(*waits: Coroutine[Any, Any, Any], at_most: float | None) -> None:
    """Return as soon as one of ``waits`` finishes or ``at_most`` seconds pass.

    The others are cancelled and awaited, so no waiter outlives the call.
    """
    tasks = [
        asyncio.create_task(waiting, name=f"outbox-relay-wait-{index}")
        for index, waiting in enumerate(waits)
    ]
    try:
        await asyncio.wait(tasks, timeout=at_most, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
