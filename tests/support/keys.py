"""API keys for tests, made by the same function the CLI uses."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from outbox_relay.config import sqlalchemy_url
from service.api_keys import DEFAULT_SCOPES, Scope, create_api_key


async def create_key(
    database_url: str, name: str, scopes: Iterable[Scope] = DEFAULT_SCOPES
) -> str:
    """A new key for principal ``name``, stored in the test database."""
    engine = create_async_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            return (await create_api_key(conn, name, scopes)).key
    finally:
        await engine.dispose()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
