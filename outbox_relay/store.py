"""The relay's side of the outbox table, over a small asyncpg pool.

Each method runs one statement from :mod:`outbox_relay.queries` in its own
implicit transaction: a claim commits before anything is sent to the broker,
and marking a batch is a single statement. asyncpg's errors are translated
here, once: losing the server becomes :class:`DatabaseUnavailableError`, which
the relay waits out; anything else (a missing table, bad credentials) is a
fault that should stop the process and propagates unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from outbox_relay import queries
from outbox_relay.config import asyncpg_dsn
from outbox_relay.errors import DatabaseUnavailableError
from outbox_relay.queries import OutboxRow

#: SQLSTATE classes that mean "try again later": connection exceptions,
#: transaction rollbacks (deadlock, serialization), insufficient resources
#: (too many connections) and operator intervention (shutdown, restart).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57"})

#: No single statement of the relay should take longer; a hung server then
#: looks like an unavailable one instead of freezing the loop.
STATEMENT_TIMEOUT_SECONDS = 30.0

#: Seconds to wait for a new connection before calling the server unreachable.
CONNECT_TIMEOUT_SECONDS = 10.0


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is (briefly) out of reach."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return False
    return isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError)


@contextmanager
def database_errors() -> Iterator[None]:
    """Turn asyncpg's connection-loss errors into ``DatabaseUnavailableError``."""
    try:
        yield
    except Exception as exc:
        if is_transient(exc):
            reason = str(exc) or type(exc).__name__
            raise DatabaseUnavailableError(reason) from exc
        raise


@dataclass(frozen=True, slots=True)
class RowFailure:
    """A row the broker did not take, and when to offer it again."""

    id: int
    error: str
    retry_in_seconds: float


@dataclass(frozen=True, slots=True)
class FailedRow:
    """A row after its failure was recorded."""

    id: int
    routing_key: str
    attempts: int
    dead: bool


@dataclass(frozen=True, slots=True)
class PendingSummary:
    """The backlog in two numbers, as the relay's gauges show it."""

    pending: int
    oldest_age_seconds: float
    #: How long the row due the longest has been due; 0 when none is due.
    longest_due_seconds: float = 0.0


async def replay_dead(database_url: str, ids: Sequence[int] | None) -> list[int]:
    """Unpark ``ids`` (every parked row when None); returns the ids unparked.

    One transaction: the rows are reset and the relays woken together.
    """
    with database_errors():
        conn: asyncpg.Connection[Any] = await asyncpg.connect(
            asyncpg_dsn(database_url), timeout=CONNECT_TIMEOUT_SECONDS
        )
    try:
        with database_errors():
            async with conn.transaction():
                records = await conn.fetch(
                    queries.REPLAY_DEAD, None if ids is None else list(ids)
                )
                if records:
                    await conn.execute(queries.NOTIFY_RELAYS)
    finally:
        await conn.close()
    return sorted(record["id"] for record in records)


class OutboxStore:
    """Claims and settles outbox rows on behalf of one relay.

    ``relay_name`` is written to ``claimed_by``; settling a failure or a
    release only touches rows this relay still holds.
    """

    def __init__(self, pool: asyncpg.Pool[Any], relay_name: str) -> None:
        self._pool = pool
        self._relay_name = relay_name

    @classmethod
    async def open(cls, database_url: str, relay_name: str) -> OutboxStore:
        """Create the pool without connecting yet.

        ``min_size=0`` lets the relay start while PostgreSQL is down; the
        first statement connects, and its failure is waited out like any other.
        """
        # One connection each for the claim, the background mark of the
        # previous batch (see outbox_relay.relay) and the backlog sampler.
        pool = await asyncpg.create_pool(
            asyncpg_dsn(database_url),
            min_size=0,
            max_size=3,
            timeout=CONNECT_TIMEOUT_SECONDS,
            command_timeout=STATEMENT_TIMEOUT_SECONDS,
            server_settings={"application_name": f"outbox_relay {relay_name}"},
        )
        return cls(pool, relay_name)

    async def close(self) -> None:
        """Close the pool; connections that do not close in time are dropped."""
        try:
            with database_errors():
                await asyncio.wait_for(
                    self._pool.close(), timeout=CONNECT_TIMEOUT_SECONDS
                )
        except DatabaseUnavailableError:
            # The server is gone or not answering; there is nothing left to
            # hand back politely.
            self._pool.terminate()

    async def claim(self, limit: int, lease_seconds: float) -> list[OutboxRow]:
        """Lease up to ``limit`` due rows to this relay (committed on return)."""
        with database_errors():
            records = await self._pool.fetch(
                queries.CLAIM_BATCH, lease_seconds, self._relay_name, limit
            )
        return [OutboxRow(**dict(record)) for record in records]

    async def mark_published(self, ids: Sequence[int]) -> None:
        """Record the broker's confirms for ``ids``, in one statement."""
        if not ids:
            return
        with database_errors():
            await self._pool.execute(queries.MARK_PUBLISHED, list(ids))

    async def mark_failed(
        self, failures: Sequence[RowFailure], max_attempts: int
    ) -> list[FailedRow]:
        """Count an attempt for each failure, parking rows that used them all."""
        if not failures:
            return []
        with database_errors():
            records = await self._pool.fetch(
                queries.MARK_FAILED,
                [failure.id for failure in failures],
                [failure.error for failure in failures],
                [failure.retry_in_seconds for failure in failures],
                self._relay_name,
                max_attempts,
            )
        return [
            FailedRow(
                id=record["id"],
                routing_key=record["routing_key"],
                attempts=record["attempts"],
                dead=record["dead"],
            )
            for record in records
        ]

    async def release(self, ids: Sequence[int]) -> None:
        """Give ``ids`` back for another claim right away, attempts unchanged."""
        if not ids:
            return
        with database_errors():
            await self._pool.execute(queries.RELEASE, list(ids), self._relay_name)

    async def pending_summary(self) -> PendingSummary:
        """How many rows wait and the age of the oldest (one index scan)."""
        with database_errors():
            record = await self._pool.fetchrow(queries.PENDING_SUMMARY)
        assert record is not None  # an aggregate without GROUP BY yields one row
        return PendingSummary(
            pending=record["pending"],
            oldest_age_seconds=record["oldest_age_seconds"],
            longest_due_seconds=record["longest_due_seconds"],
        )

    async def seconds_until_next_due(self) -> float | None:
        """Seconds until the next row is due (<= 0: now); None if none is pending."""
        with database_errors():
            value = await self._pool.fetchval(queries.NEXT_AVAILABLE_AT)
        return None if value is None else float(value)
