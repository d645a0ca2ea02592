"""Command line of the API: ``python -m service`` serves it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import TypeVar

import click
import structlog
import uvicorn
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from outbox_relay.config import load_env_file, load_settings, sqlalchemy_url
from outbox_relay.errors import SettingsError
from outbox_relay.logs import configure_logging
from service import api_keys
from service.api_keys import DEFAULT_SCOPES, Scope
from service.app import create_app
from service.migrate import create_database_if_missing, upgrade_to_head
from service.settings import ServiceSettings

ResultT = TypeVar("ResultT")


@click.group(invoke_without_command=True)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Outbox task service API. Without a command, serve the API."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


def _settings() -> ServiceSettings:
    load_env_file()
    try:
        settings = load_settings(ServiceSettings)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    configure_logging(settings.log_level, settings.log_json)
    return settings


@main.command("serve")
def serve() -> None:
    """Serve the HTTP API on API_HOST:API_PORT."""
    settings = _settings()
    try:
        app = create_app(settings)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc

    # uvicorn handles SIGTERM and SIGINT: it stops accepting connections, lets
    # in-flight requests finish and runs the lifespan shutdown (closing the
    # pool). Afterwards it re-raises the signal against the handlers that were
    # installed before it started; these make that a clean exit with status 0
    # instead of death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=20,
    )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


@main.command("migrate")
def migrate() -> None:
    """Create the database if it is missing and apply every migration."""
    settings = _settings()
    asyncio.run(create_database_if_missing(settings.database_url))
    upgrade_to_head(settings.database_url)
    structlog.get_logger(__name__).info("database_migrated")


def _with_connection(
    settings: ServiceSettings,
    work: Callable[[AsyncConnection], Awaitable[ResultT]],
) -> ResultT:
    async def run() -> ResultT:
        engine = create_async_engine(
            sqlalchemy_url(settings.database_url), poolclass=pool.NullPool
        )
        try:
            async with engine.connect() as conn:
                return await work(conn)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@main.group("api-keys")
def api_keys_command() -> None:
    """Create, list and revoke the API keys that clients send as bearer tokens."""


@api_keys_command.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice([scope.value for scope in Scope]),
    help="Repeat for several; default: tasks:read and tasks:write.",
)
def create_key(name: str, scopes: tuple[str, ...]) -> None:
    """Create a key for principal NAME and print it; it is never shown again.

    The key alone goes to standard output, so `KEY=$(... create me)` keeps
    it; what it is for goes to standard error.
    """
    settings = _settings()
    chosen = [Scope(value) for value in scopes] or list(DEFAULT_SCOPES)
    try:
        created = _with_connection(
            settings, lambda conn: api_keys.create_api_key(conn, name, chosen)
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    click.echo(
        f"API key {created.key_id} for {created.name} "
        f"({' '.join(created.scopes)}); store it now, it is not shown again:",
        err=True,
    )
    click.echo(created.key)


@api_keys_command.command("list")
def list_keys() -> None:
    """Show every key: id, principal, scopes, dates. Never the key itself."""
    settings = _settings()
    keys = _with_connection(settings, api_keys.list_api_keys)
    click.echo(f"{'KEY ID':<16}  {'NAME':<20}  {'SCOPES':<30}  CREATED / REVOKED")
    for key in keys:
        revoked = f"  revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else ""
        click.echo(
            f"{key.key_id:<16}  {key.name:<20}  {' '.join(key.scopes):<30}  "
            f"{key.created_at:%Y-%m-%d %H:%M}{revoked}"
        )


@api_keys_command.command("revoke")
@click.argument("key_id_or_name")
def revoke_keys(key_id_or_name: str) -> None:
    """Revoke one key by its id, or all keys of a principal by its name.

    Takes effect with the next request, on every API replica.
    """
    settings = _settings()
    revoked = _with_connection(
        settings, lambda conn: api_keys.revoke_api_keys(conn, key_id_or_name)
    )
    if not revoked:
        raise click.ClickException(f"no live key matches {key_id_or_name!r}")
    click.echo(f"revoked {', '.join(revoked)}")


if __name__ == "__main__":
    main()
