"""The Alembic migrations and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import consumer.models  # noqa: F401  (registers the inbox table)
from outbox_relay.config import sqlalchemy_url
from outbox_relay.schema import metadata
from service.migrate import ROOT, upgrade_to_head


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_migrated_schema_matches_the_models(database_url: str) -> None:
    engine = create_async_engine(sqlalchemy_url(database_url))
    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(_diff)
    finally:
        await engine.dispose()

    assert differences == []


async def test_downgrade_to_base_and_upgrade_again(
    database_url: str, db: asyncpg.Connection
) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False

    await asyncio.to_thread(command.downgrade, config, "base")
    left = await db.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        " AND tablename <> 'alembic_version'"
    )
    assert left == []

    await asyncio.to_thread(upgrade_to_head, database_url)
    tables = {
        row["tablename"]
        for row in await db.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    }
    assert {"tasks", "outbox", "inbox"} <= tables


async def test_tasks_from_before_api_keys_belong_to_the_legacy_principal(
    database_url: str, db: asyncpg.Connection
) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    await asyncio.to_thread(command.downgrade, config, "0001")
    await db.execute(
        "INSERT INTO tasks (id, title, type, payload, priority, status, max_attempts)"
        " VALUES (gen_random_uuid(), 'old', 'checksum', '{}', 'LOW', 'NEW', 1)"
    )

    await asyncio.to_thread(upgrade_to_head, database_url)

    assert await db.fetchval("SELECT owner FROM tasks") == "legacy"
    tables = await db.fetch(
        "SELECT tablename FROM pg_tables WHERE tablename IN"
        " ('api_keys', 'idempotency_keys')"
    )
    assert len(tables) == 2
