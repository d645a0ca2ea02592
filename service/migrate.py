"""Bring the database to the current schema, creating the database if needed."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog
from alembic import command
from alembic.config import Config

from outbox_relay.config import asyncpg_dsn

ROOT = Path(__file__).resolve().parent.parent

logger = structlog.get_logger(__name__)


async def create_database_if_missing(database_url: str) -> bool:
    """Create the database named in the URL; True if it had to be created.

    Connects to the server's ``postgres`` database to do so, which needs the
    CREATEDB privilege; with an existing database nothing is asked of it.
    """
    dsn = asyncpg_dsn(database_url)
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False

    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        try:
            await admin.execute(f"CREATE DATABASE {quoted}")
        except asyncpg.DuplicateDatabaseError:
            # Another replica's migrate step won the race; that is fine.
            return False
    finally:
        await admin.close()
    logger.info("database_created", database=name)
    return True


def upgrade_to_head(database_url: str) -> None:
    """Run Alembic's ``upgrade head``; it must not be called from a running loop."""
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")
