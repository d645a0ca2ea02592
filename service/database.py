"""The API's connection pool, and the driver's connection for the hot path.

One pool serves the whole API: SQLAlchemy's, on asyncpg. Most routes go
through SQLAlchemy Core; the key check and task submission borrow the pooled
connection's asyncpg connection and run the statements of
:mod:`service.queries` on it directly, which costs a fraction of building
and compiling a statement per request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import asyncpg
import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from outbox_relay.config import sqlalchemy_url
from service.settings import ServiceSettings


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
        pool_timeout=5,
        pool_pre_ping=False,
        connect_args={
            "timeout": 5,
            "command_timeout": 30,
            "server_settings": {"application_name": "outbox-tasks-api"},
        },
    )


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
