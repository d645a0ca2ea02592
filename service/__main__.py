"""Command line of the API: ``python -m service`` serves it."""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

import click
import structlog
import uvicorn

from outbox_relay.config import load_env_file, load_settings
from outbox_relay.logs import configure_logging
from service.app import create_app
from service.migrate import create_database_if_missing, upgrade_to_head
from service.settings import ServiceSettings


@click.group(invoke_without_command=True)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Outbox task service API. Without a command, serve the API."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


def _settings() -> ServiceSettings:
    load_env_file()
    settings = load_settings(ServiceSettings)
    configure_logging(settings.log_level, settings.log_json)
    return settings


@main.command("serve")
def serve() -> None:
    """Serve the HTTP API on API_HOST:API_PORT."""
    settings = _settings()
    app = create_app(settings)

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


if __name__ == "__main__":
    main()
