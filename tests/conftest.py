"""Fixtures shared by every test layer.

Each test that needs PostgreSQL gets its own database, cloned from a template
that was migrated once per run; each test that needs RabbitMQ gets its own
AMQP_PREFIX. Both are removed afterwards, and nothing else on the servers is
touched.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from tests.support import databases
from tests.support.broker import delete_topology

ROOT = Path(__file__).resolve().parent.parent

#: Server-level URL for creating and dropping test databases.
ADMIN_DATABASE_URL = os.environ.get(
    "TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def database_url_for(name: str) -> str:
    return databases.database_url_for(ADMIN_DATABASE_URL, name)


async def _admin_execute(sql: str) -> None:
    await databases.admin_execute(ADMIN_DATABASE_URL, sql)


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    """A database migrated to head once per run, cloned for each test."""
    import asyncio

    name = f"ot_template_{secrets.token_hex(4)}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        databases.migrate_to_head(database_url_for(name))
        yield name
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def database_url(template_database: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated database that only this test uses."""
    name = f"ot_test_{secrets.token_hex(6)}"
    await _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    try:
        yield database_url_for(name)
    finally:
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the test database, for arranging and checking."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def amqp_prefix() -> AsyncIterator[str]:
    """A unique AMQP_PREFIX; the test's exchanges and queues are deleted after."""
    prefix = f"test-{secrets.token_hex(5)}"
    yield prefix
    await delete_topology(AMQP_URL, prefix)


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        yield connection
    finally:
        await connection.close()
