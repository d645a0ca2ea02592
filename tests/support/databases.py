"""Scratch databases on a PostgreSQL server, for the tests and the benchmark.

Both create databases of their own through a server-level ("admin") URL and
drop them afterwards; these are the steps they share.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent.parent


def database_url_for(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``admin_url``."""
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


async def admin_execute(admin_url: str, sql: str) -> None:
    """Run ``sql`` (CREATE or DROP DATABASE) on a connection of its own."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def migrate_to_head(database_url: str) -> None:
    """Migrate ``database_url`` as a deployment does: Alembic in a process of
    its own, so its logging setup stays out of the caller's."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
        capture_output=True,
    )
