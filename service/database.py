"""The API's connection pools: SQLAlchemy's for most routes, asyncpg's for the hot path.

Most routes go through SQLAlchemy Core on its pool (on asyncpg). The two
statements nearly every request runs, the key check and the task
submission, are plain SQL (:mod:`service.queries`) on a pool of asyncpg's
own: checking a connection out of SQLAlchemy's asyncio pool costs a greenlet
switch and several layers of wrappers, and under load that was a sixth of
the API's time per submission. Each pool holds up to ``DB_POOL_SIZE``
connections, opened when first needed, so the API starts, and answers 503,
while PostgreSQL is down.

The consumer borrows SQLAlchemy's pooled connections as asyncpg's own
(:func:`driver_connection`) for its batched statements.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import asyncpg
import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from outbox_relay.config import asyncpg_dsn, sqlalchemy_url
from service.settings import ServiceSettings

#: Seconds a request waits for a pooled connection before it is answered 503.
POOL_TIMEOUT_SECONDS = 5
#: Seconds to connect, and the longest any statement may run.
CONNECT_TIMEOUT_SECONDS = 5
COMMAND_TIMEOUT_SECONDS = 30
APPLICATION_NAME = "outbox-tasks-api"


def create_engine(settings: ServiceSettings) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(settings.database_url),
        # A fixed pool: requests beyond it wait (up to pool_timeout) for a
        # connection. Overflow connections would be closed on return, so a
        # steady load above the pool size would start a PostgreSQL backend
        # for most requests.
        pool_size=settings.db_pool_size,
        max_overflow=0,
        # Fail fast when PostgreSQL is unreachable, so a request answers 503
        # instead of hanging until the client gives up.
        pool_timeout=POOL_TIMEOUT_SECONDS,
        pool_pre_ping=False,
        connect_args={
            "timeout": CONNECT_TIMEOUT_SECONDS,
            "command_timeout": COMMAND_TIMEOUT_SECONDS,
            "server_settings": {"application_name": APPLICATION_NAME},
        },
    )


async def create_driver_pool(settings: ServiceSettings) -> asyncpg.Pool[Any]:
    """The hot path's pool; connects nothing until a connection is asked for.

    Check connections out with :func:`pooled`. A connection that died with
    the server is replaced when it is returned, so after an outage each dead
    one fails one request (503) at most.
    """
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        asyncpg_dsn(settings.database_url),
        min_size=0,
        max_size=settings.db_pool_size,
        timeout=CONNECT_TIMEOUT_SECONDS,
        command_timeout=COMMAND_TIMEOUT_SECONDS,
        server_settings={"application_name": APPLICATION_NAME},
        reset=_nothing_to_reset,
    )
    return pool


async def _nothing_to_reset(conn: asyncpg.Connection[Any]) -> None:
    """Replaces asyncpg's reset query on release (``RESET ALL``, ``UNLISTEN
    *``, ...), a round trip per checkout. The hot path leaves nothing for it:
    no session settings, listeners, cursors or advisory locks. asyncpg still
    rolls back a transaction left open before it calls this."""


@asynccontextmanager
async def pooled(
    pool: asyncpg.Pool[Any],
) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A connection of the hot path's pool for the block.

    Raises TimeoutError (answered 503) when none frees up within
    ``POOL_TIMEOUT_SECONDS``. Only the wait is bounded, by a timer rather
    than asyncpg's own ``timeout``, which runs every checkout in a task.
    """
    async with asyncio.timeout(POOL_TIMEOUT_SECONDS):
        conn = await pool.acquire()
    try:
        # The pool's proxy forwards every call to the connection it holds.
        yield cast("asyncpg.Connection[Any]", conn)
    except asyncpg.InternalClientError as exc:
        # What asyncpg raises, instead of a connection error, for a statement
        # sent while it still reads the farewell of a server that just closed
        # the connection (a restart, pg_terminate_backend): the connection is
        # gone, and the request gets the 503 of any other lost connection.
        if conn.is_closed():
            raise asyncpg.ConnectionDoesNotExistError(str(exc)) from exc
        raise
    finally:
        await pool.release(conn)


@asynccontextmanager
async def driver_connection(
    engine: AsyncEngine,
) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A pooled connection as asyncpg's own, returned to the pool afterwards.

    Statements run on it in autocommit unless the caller opens a transaction
    with ``conn.transaction()``; asyncpg rolls that back if the block raises,
    so the connection goes back to the pool clean either way.

    Errors raised here bypass SQLAlchemy, which would otherwise notice a dead
    connection and drop it; so a connection found closed (the server went
    away) is dropped from the pool here, before use and after a failure, and
    the pool recovers once the server is back.
    """
    async with engine.connect() as conn:
        driver = await _driver(conn)
        if driver.is_closed():
            await conn.invalidate()
            driver = await _driver(conn)
        try:
            yield driver
        except BaseException:
            if driver.is_closed():
                await conn.invalidate()
            raise


def json_text(value: Any) -> str:
    """``value`` as JSON text, for a ``jsonb`` parameter (cast in SQL) or a
    SQLAlchemy engine's ``json_serializer``. msgspec writes what ``json.dumps``
    would refuse or mangle (NaN becomes null)."""
    return msgspec.json.encode(value).decode()


async def _driver(conn: AsyncConnection) -> asyncpg.Connection[Any]:
    pooled = await conn.get_raw_connection()
    driver = pooled.driver_connection
    # Set for as long as the pooled connection is checked out, as it is here.
    assert driver is not None
    return cast("asyncpg.Connection[Any]", driver)
