"""Scratch resources of one benchmark measurement, and the shared helpers.

Every measurement gets its own migrated database and its own AMQP prefix, and
removes both afterwards; nothing else on the servers is touched. Processes of
this project are started through ``tests.support.processes`` so the benchmark
runs exactly what the end-to-end tests run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import asyncpg

from tests.support import databases
from tests.support.broker import delete_topology
from tests.support.processes import ProcessGroup, base_env
from tests.support.proxy import free_port

ROOT = Path(__file__).resolve().parent.parent

ADMIN_DATABASE_URL = os.environ.get(
    "BENCH_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

#: The body every HTTP client sends: the default task type with a small payload.
TASK_BODY = b'{"title": "bench", "payload": {"text": "hello"}}'


def database_url_for(name: str) -> str:
    return databases.database_url_for(ADMIN_DATABASE_URL, name)


async def _admin_execute(sql: str) -> None:
    await databases.admin_execute(ADMIN_DATABASE_URL, sql)


@contextlib.asynccontextmanager
async def scratch_database(*, migrated: bool = True) -> AsyncIterator[str]:
    """URL of a new database (migrated to head unless told), dropped after."""
    name = f"ot_bench_{secrets.token_hex(5)}"
    await _admin_execute(f'CREATE DATABASE "{name}"')
    url = database_url_for(name)
    try:
        if migrated:
            await asyncio.to_thread(databases.migrate_to_head, url)
        yield url
    finally:
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def scratch_prefix() -> AsyncIterator[str]:
    """A unique AMQP prefix; its topology is deleted afterwards."""
    prefix = f"bench-{secrets.token_hex(5)}"
    try:
        yield prefix
    finally:
        await delete_topology(AMQP_URL, prefix)


@contextlib.contextmanager
def pipeline(
    database_url: str, prefix: str, log_dir: Path, **extra_env: str
) -> Iterator[ProcessGroup]:
    """A process group configured as a user would run it, plus what a
    benchmark needs: a rate limit high enough not to refuse the load (it is
    still checked in Redis on every request) and INFO logs to files."""
    env = base_env(database_url, AMQP_URL, prefix, free_port())
    # The benchmark measures the product's defaults, not the tests' settings.
    for test_only in (
        "TASK_HANDLER_MODULES",
        "RELAY_POLL_INTERVAL",
        "RETRY_BACKOFF_BASE_SECONDS",
        "RETRY_BACKOFF_MAX_SECONDS",
    ):
        env.pop(test_only)
    env.update({"API_RATE_LIMIT_PER_MINUTE": "100000000", **extra_env})
    log_dir.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup(env=env, log_dir=log_dir, api_port=int(env["API_PORT"]))
    try:
        yield group
    finally:
        for name in list(group.running):
            with contextlib.suppress(Exception):
                group.stop(name, timeout=40)


async def create_raw_tables(conn: asyncpg.Connection) -> None:
    """``raw_tasks``, ``raw_outbox`` and ``raw_inbox``: the project's tables'
    columns, defaults and indexes, without its triggers, for the baselines."""
    await conn.execute(
        """
        CREATE TABLE raw_tasks (LIKE tasks INCLUDING ALL);
        CREATE TABLE raw_outbox (LIKE outbox INCLUDING ALL);
        CREATE TABLE raw_inbox (LIKE inbox INCLUDING ALL);
        """
    )


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values`` (0 < fraction <= 1)."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]
