"""``python -m consumer``: run task handlers, or look after the dead letters.

Without a command the consumer runs until SIGTERM or SIGINT: it stops taking
messages, lets running tasks finish within ``CONSUMER_SHUTDOWN_GRACE_SECONDS``
and exits 0; tasks still running then are handed back and their messages
redelivered to another consumer.

``python -m consumer dead-letters list`` shows what sits in the dead-letter
queue and why; ``dead-letters replay`` publishes chosen messages again.
``python -m consumer status`` shows the inbox's throughput over the last hour.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

import click
import msgspec
import structlog
import uvloop
from sqlalchemy.exc import SQLAlchemyError

from consumer.consumer import TaskConsumer
from consumer.dead_letter_queue import (
    DeadLetter,
    DeadLetterQueueError,
    list_dead_letters,
    replay_dead_letters,
)
from consumer.retention import inbox_retention
from consumer.settings import ConsumerSettings
from consumer.status import format_throughput, read_throughput
from outbox_relay.config import load_env_file, load_settings
from outbox_relay.errors import SettingsError
from outbox_relay.logs import configure_logging
from outbox_relay.worker import serve_worker
from service.registry import HandlerRegistry, load_registry

logger = structlog.get_logger("consumer")

#: Exit status of a consumer started with invalid settings.
EXIT_BAD_SETTINGS = 2


async def _serve(settings: ConsumerSettings, registry: HandlerRegistry) -> None:
    consumer = TaskConsumer(settings, registry)
    await serve_worker(
        "consumer",
        consumer.run,
        is_ready=lambda: consumer.is_ready,
        health_host=settings.consumer_health_host,
        health_port=settings.consumer_health_port,
        retention=inbox_retention(settings),
    )


def _load() -> ConsumerSettings:
    load_env_file()
    try:
        return load_settings(ConsumerSettings)
    except SettingsError as exc:
        configure_logging()
        logger.error("settings_invalid", error=str(exc))
        sys.exit(EXIT_BAD_SETTINGS)


@click.group(invoke_without_command=True)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Run task handlers for messages; without a command, run the consumer."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@main.command()
def run() -> None:
    """Consume until SIGTERM or SIGINT, then drain and exit 0."""
    settings = _load()
    configure_logging(settings.log_level, settings.log_json)
    logger.info("consumer_starting", settings=repr(settings))
    try:
        registry = load_registry(settings.task_handler_modules)
    except SettingsError as exc:
        logger.error("settings_invalid", error=str(exc))
        sys.exit(EXIT_BAD_SETTINGS)
    try:
        # uvloop: the same asyncio, with its loop and sockets in C.
        uvloop.run(_serve(settings, registry))
    except Exception:
        logger.exception("consumer_crashed")
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(as_json: bool) -> None:
    """Show messages processed per minute of the last hour (inbox_throughput)."""
    settings = _load()
    try:
        throughput = asyncio.run(read_throughput(settings.database_url))
    except (OSError, SQLAlchemyError) as exc:
        # The driver's own message, without SQLAlchemy's statement and links.
        reason = getattr(exc, "orig", None) or exc
        raise click.ClickException(f"cannot read the inbox: {reason}") from exc

    if as_json:
        click.echo(msgspec.json.encode(throughput).decode())
    else:
        click.echo(format_throughput(throughput))


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect and replay the messages in the dead-letter queue."""


@dead_letters.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Show at most this many, oldest first.",
)
def list_command(as_json: bool, limit: int | None) -> None:
    """Show each dead letter with why and when it was dead-lettered."""
    settings = _load()
    try:
        letters = asyncio.run(
            list_dead_letters(settings.amqp_url, settings.amqp_prefix, limit)
        )
    except DeadLetterQueueError as exc:
        raise click.ClickException(str(exc)) from exc

    if as_json:
        click.echo(msgspec.json.encode(letters).decode())
    else:
        click.echo(_letters_table(letters))


@dead_letters.command("replay")
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.argument("message_ids", nargs=-1)
def replay_command(replay_all: bool, message_ids: tuple[str, ...]) -> None:
    """Publish dead letters again, as the relay first did, and remove them.

    Name the messages by message id, or pass --all. Exits 1 if a message id
    named is not in the dead-letter queue.
    """
    if replay_all == bool(message_ids):
        raise click.UsageError("name the messages to replay, or pass --all (not both)")

    settings = _load()
    try:
        result = asyncio.run(
            replay_dead_letters(
                settings.amqp_url,
                settings.amqp_prefix,
                None if replay_all else message_ids,
            )
        )
    except DeadLetterQueueError as exc:
        raise click.ClickException(str(exc)) from exc

    click.echo(
        f"replayed {len(result.replayed)} message(s): "
        + (", ".join(result.replayed) or "none")
    )
    if result.missing:
        click.echo(
            "not in the dead-letter queue: " + ", ".join(result.missing), err=True
        )
        sys.exit(1)


def _letters_table(letters: list[DeadLetter]) -> str:
    header = ("message id", "routing key", "task", "by", "when", "reason")
    rows = [
        (
            letter.message_id or "-",
            letter.routing_key,
            letter.correlation_id or "-",
            letter.dead_lettered_by,
            _when(letter.dead_lettered_at),
            letter.reason,
        )
        for letter in letters
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    lines = [
        "  ".join(
            [
                *(cell.ljust(width) for cell, width in zip(row, widths, strict=False)),
                row[5],
            ]
        ).rstrip()
        for row in [header, *rows]
    ]
    lines.append("")
    lines.append(f"{len(letters)} dead letter(s)")
    return "\n".join(lines)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


if __name__ == "__main__":
    main()
