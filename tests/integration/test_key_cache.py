"""The API's key cache on the real database: keys are answered from it, and
every change to the keys, or a lost notification connection, empties it."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
from litestar import Litestar
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.registry import load_registry
from service.settings import ServiceSettings
from tests.integration.test_auth import assert_problem, run_cli
from tests.support.waiting import eventually


async def answering(app: Litestar) -> None:
    async def check() -> bool:
        return bool(app.state.key_cache.answering)

    await eventually(check, seconds=10, what="the key cache listening")


async def status(api: AsyncTestClient[Any], headers: dict[str, str]) -> int:
    return (await api.get("/api/v1/tasks", headers=headers)).status_code


async def refused(api: AsyncTestClient[Any], headers: dict[str, str]) -> None:
    async def check() -> bool:
        return await status(api, headers) == 401

    await eventually(check, seconds=5, what="the key refused")


async def change_unheard(db: asyncpg.Connection, sql: str) -> None:
    """Run ``sql`` with triggers off for this session, so no notification."""
    async with db.transaction():
        await db.execute("SET LOCAL session_replication_role = replica")
        await db.execute(sql)


async def cached_then_changed_unheard(
    app: Litestar,
    api: AsyncTestClient[Any],
    headers: dict[str, str],
    db: asyncpg.Connection,
    sql: str,
) -> None:
    """Get the key of ``headers`` cached, then run ``sql`` without telling
    the cache: the key still passes."""
    await answering(app)
    assert await status(api, headers) == 200
    await change_unheard(db, sql)
    assert await status(api, headers) == 200


async def test_a_checked_key_is_answered_from_the_cache(
    api_app: Litestar,
    api: AsyncTestClient[Any],
    alice: dict[str, str],
    db: asyncpg.Connection,
) -> None:
    # The stored key no longer matches, but nothing told the cache.
    await cached_then_changed_unheard(
        api_app, api, alice, db, "UPDATE api_keys SET key_hash = 'x'"
    )

    # Any change that is heard empties it; the table decides again.
    await db.execute("UPDATE api_keys SET scopes = scopes")
    await refused(api, alice)


async def test_a_revoked_key_is_refused_although_it_was_cached(
    api_app: Litestar,
    api: AsyncTestClient[Any],
    alice: dict[str, str],
    database_url: str,
) -> None:
    await answering(api_app)
    assert await status(api, alice) == 200

    await run_cli(database_url, "api-keys", "revoke", "alice")

    assert_problem(await api.get("/api/v1/tasks", headers=alice), 401)


async def test_a_lost_notification_connection_empties_the_cache(
    api_app: Litestar,
    api: AsyncTestClient[Any],
    alice: dict[str, str],
    db: asyncpg.Connection,
) -> None:
    await cached_then_changed_unheard(
        api_app, api, alice, db, "UPDATE api_keys SET revoked_at = now()"
    )

    # Whatever changed while nobody listened must not be answered from the
    # cache: while the connection is down and after it is back.
    await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'outbox-tasks-api listen'"
        " AND datname = current_database()"
    )
    await refused(api, alice)
    await answering(api_app)
    assert await status(api, alice) == 401


async def test_a_cache_time_of_zero_looks_every_key_up(
    api_settings: ServiceSettings,
    alice: dict[str, str],
    db: asyncpg.Connection,
) -> None:
    settings = msgspec.structs.replace(api_settings, api_key_cache_seconds=0)
    app = create_app(settings, load_registry())
    async with AsyncTestClient(app) as api:
        assert await status(api, alice) == 200
        await change_unheard(db, "UPDATE api_keys SET revoked_at = now()")
        assert await status(api, alice) == 401
        assert not app.state.key_cache.answering
