"""``python -m outbox_relay``: run the relay, show the outbox lag, replay parked rows.

Settings come from the environment and a ``.env`` file in the working
directory (see :class:`outbox_relay.settings.RelaySettings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterator

import asyncpg
import click
import msgspec
import structlog
import uvloop

from outbox_relay.config import load_env_file, load_settings
from outbox_relay.errors import RelayError, SettingsError
from outbox_relay.logs import configure_logging
from outbox_relay.relay import OutboxRelay
from outbox_relay.retention import (
    DELETE_PUBLISHED_OUTBOX,
    OUTBOX_RETENTION_LOCK,
    RetentionSchedule,
    retention_schedule,
)
from outbox_relay.settings import RelaySettings
from outbox_relay.status import format_lag, read_lag
from outbox_relay.store import replay_dead
from outbox_relay.worker import serve_worker

log = structlog.get_logger(__name__)


def _settings() -> RelaySettings:
    load_env_file()
    try:
        return load_settings(RelaySettings)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(invoke_without_command=True)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Publish outbox rows to RabbitMQ; without a command, run the relay."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@main.command()
def run() -> None:
    """Run the relay until SIGTERM or SIGINT, then drain and exit 0."""
    settings = _settings()
    configure_logging(settings.log_level, settings.log_json)
    # The relay reports a lost broker once, as outbox_dependency_down, and its
    # return as outbox_dependency_up; these two would add a line per attempt.
    for chatty in ("aiormq.connection", "aio_pika.robust_connection"):
        logging.getLogger(chatty).setLevel(logging.CRITICAL)
    log.info("outbox_relay_configured", settings=repr(settings))

    try:
        # uvloop: the same asyncio, with its loop and sockets in C.
        uvloop.run(_serve(settings))
    except Exception:
        log.exception("outbox_relay_crashed")
        sys.exit(1)


async def _serve(settings: RelaySettings) -> None:
    relay = OutboxRelay(settings)
    await serve_worker(
        "outbox_relay",
        relay.run,
        is_ready=lambda: relay.is_ready,
        health_host=settings.relay_health_host,
        health_port=settings.relay_health_port,
        retention=outbox_retention(settings),
        stopping_event="outbox_relay_stopping",
    )


def outbox_retention(settings: RelaySettings) -> RetentionSchedule | None:
    """The schedule that deletes old published rows; None when it is turned off."""
    return retention_schedule(
        name="outbox",
        database_url=settings.database_url,
        statement=DELETE_PUBLISHED_OUTBOX,
        retention_hours=settings.outbox_retention_hours,
        interval_seconds=settings.retention_interval_seconds,
        lock_key=OUTBOX_RETENTION_LOCK,
    )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(as_json: bool) -> None:
    """Show the backlog per routing key, publish latency and parked rows.

    The same figures as the views outbox_lag, outbox_publish_latency and
    outbox_dead. Inbox throughput is the consumer's business: see
    `python -m consumer status`.
    """
    settings = _settings()
    with _outbox_errors("cannot read the outbox"):
        lag = asyncio.run(read_lag(settings.database_url))

    if as_json:
        click.echo(msgspec.json.encode(lag).decode())
    else:
        click.echo(format_lag(lag))


@main.command("replay-dead")
@click.option("--all", "replay_all", is_flag=True, help="Replay every parked row.")
@click.argument("ids", nargs=-1, type=int)
def replay_dead_command(replay_all: bool, ids: tuple[int, ...]) -> None:
    """Give parked rows (see the outbox_dead view) a fresh set of attempts.

    Name the rows by id, or pass --all. Each row's attempts start again from
    zero and it is published at once by a running relay. Exits 1 if an id
    named was not a parked row.
    """
    if replay_all == bool(ids):
        raise click.UsageError("name the rows to replay, or pass --all (not both)")

    settings = _settings()
    with _outbox_errors("cannot reach the outbox"):
        replayed = asyncio.run(
            replay_dead(settings.database_url, None if replay_all else ids)
        )

    click.echo(f"replayed {len(replayed)} row(s): {_id_list(replayed)}")
    missing = sorted(set(ids) - set(replayed))
    if missing:
        click.echo(f"not parked, left alone: {_id_list(missing)}", err=True)
        sys.exit(1)


def _id_list(ids: list[int]) -> str:
    return ", ".join(str(row_id) for row_id in ids) or "none"


@contextlib.contextmanager
def _outbox_errors(what: str) -> Iterator[None]:
    """A database that is down, missing or not migrated, as one line after
    ``what`` rather than a traceback."""
    try:
        yield
    except (RelayError, asyncpg.PostgresError) as exc:
        hint = ""
        if isinstance(exc, asyncpg.UndefinedTableError):
            hint = " (is the database migrated? run `python -m service migrate`)"
        raise click.ClickException(f"{what}: {exc}{hint}") from exc


if __name__ == "__main__":
    main()
