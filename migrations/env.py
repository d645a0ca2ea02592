"""Alembic environment: runs migrations over asyncpg against DATABASE_URL."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import consumer.models  # noqa: F401  (registers the inbox table)
from outbox_relay.config import load_env_file, load_settings, sqlalchemy_url
from outbox_relay.schema import metadata
from service.settings import DatabaseSettings

config = context.config
if config.config_file_name is not None and config.attributes.get(
    "configure_logger", True
):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    # Tests pass the URL of their throw-away database explicitly.
    explicit = config.attributes.get("database_url")
    if explicit:
        return str(explicit)
    load_env_file()
    return load_settings(DatabaseSettings).database_url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(
        sqlalchemy_url(_database_url()), poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=sqlalchemy_url(_database_url()),
        target_metadata=metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
