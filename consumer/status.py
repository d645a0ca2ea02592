"""The inbox's throughput for ``python -m consumer status``.

The relay knows nothing of the inbox, so the consumer reports it: how many
messages had their effect committed in each minute of the last hour, from
the ``inbox_throughput`` view, as a table or one JSON object.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from consumer import queries
from outbox_relay.config import sqlalchemy_url
from outbox_relay.tables import render_table


class InboxMinute(msgspec.Struct, frozen=True, kw_only=True):
    """One minute of the last hour (a row of ``inbox_throughput``)."""

    minute: datetime
    processed: int
    per_second: float


class InboxThroughput(msgspec.Struct, frozen=True, kw_only=True):
    """Messages processed in the last hour, per minute, newest first."""

    processed_last_hour: int
    minutes: list[InboxMinute]


async def read_throughput(database_url: str) -> InboxThroughput:
    """Read the ``inbox_throughput`` view over a connection of its own."""
    engine = create_async_engine(
        sqlalchemy_url(database_url),
        poolclass=pool.NullPool,
        connect_args={"timeout": 10},
    )
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(queries.INBOX_THROUGHPUT)).all()
    finally:
        await engine.dispose()

    minutes = [
        InboxMinute(
            minute=row.minute, processed=row.processed, per_second=float(row.per_second)
        )
        for row in rows
    ]
    return InboxThroughput(
        processed_last_hour=sum(minute.processed for minute in minutes),
        minutes=minutes,
    )


def format_throughput(throughput: InboxThroughput) -> str:
    """The table ``python -m consumer status`` prints."""
    table = render_table(
        ("minute", "processed", "per second"),
        [
            (
                minute.minute.strftime("%Y-%m-%d %H:%M"),
                str(minute.processed),
                f"{minute.per_second:.2f}",
            )
            for minute in throughput.minutes
        ],
    )
    if not throughput.minutes:
        table += "\n(nothing processed in the last hour)"
    return f"{table}\n\nprocessed in the last hour {throughput.processed_last_hour}"
