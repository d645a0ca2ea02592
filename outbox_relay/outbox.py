"""Writing to the outbox: the only way a message enters the pipeline.

Call :func:`enqueue` inside the transaction that makes the change the message
announces. If that transaction rolls back the message never existed; if it
commits, the relay will publish it at least once, whatever dies afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox_relay.schema import outbox

#: The channel a trigger on the outbox notifies after each inserting statement.
NOTIFY_CHANNEL = "outbox_pending"


class OutboxMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message to publish.

    ``body`` must be JSON-serialisable; ``correlation_id`` becomes the AMQP
    property of that name (for task events, the task id).
    """

    routing_key: str
    body: Mapping[str, Any]
    correlation_id: str | None = None
    headers: Mapping[str, str] = msgspec.field(default_factory=dict)
    available_at: datetime | None = None


async def enqueue(conn: AsyncConnection, *messages: OutboxMessage) -> list[int]:
    """Insert ``messages`` into the outbox in the caller's transaction.

    Returns the new rows' ids, which become the AMQP ``message_id``s.
    """
    if not messages:
        return []

    rows = []
    for message in messages:
        row: dict[str, Any] = {
            "routing_key": message.routing_key,
            "body": message.body,
            "headers": dict(message.headers),
            "correlation_id": message.correlation_id,
        }
        if message.available_at is not None:
            row["available_at"] = message.available_at
        rows.append(row)

    # Rows with and without available_at take different column lists, so each
    # goes in its own statement; the common case is a single row anyway.
    ids: list[int] = []
    for row in rows:
        result = await conn.execute(insert(outbox).values(row).returning(outbox.c.id))
        ids.append(result.scalar_one())
    return ids
