"""Looking into ``{prefix}.dead-letter`` and replaying what is there.

Both operations read the queue with ``basic.get`` and manual acks, holding
every message they look at un-acked until they are done, so each message is
seen once per run and any message not acked goes back to the queue when the
channel closes. Listing acks nothing. Replaying publishes each chosen message
to the events exchange with its original routing key and properties (minus
the dead-letter headers), waits for the broker's confirm, and only then acks
it from the dead-letter queue: a replay that dies half-way can publish a
message twice, which the consumer's inbox absorbs, but never loses one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from consumer.dead_letters import (
    DEAD_LETTER_HEADERS,
    DEAD_LETTERED_AT_HEADER,
    REASON_HEADER,
    copy_message,
)
from consumer.errors import ConsumerError
from consumer.topology import TopologyNames

#: Seconds to wait for the broker to confirm one replayed message.
CONFIRM_TIMEOUT_SECONDS = 10.0


class DeadLetterQueueError(ConsumerError):
    """The dead-letter queue or the broker cannot be used right now."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One message in the dead-letter queue, as ``dead-letters list`` shows it."""

    message_id: str | None
    routing_key: str
    #: The task id, for task messages.
    correlation_id: str | None
    #: The consumer's ``x-dead-letter-reason``, or the broker's ``x-death``
    #: reason (``delivery_limit``, ``rejected``, ...).
    reason: str
    #: ``consumer`` or ``broker``: who dead-lettered it.
    dead_lettered_by: str
    dead_lettered_at: datetime | None
    body_bytes: int


@dataclass
class ReplayResult:
    """Message ids replayed, and requested ids not found in the queue."""

    replayed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    """What a dead letter says about itself, from its headers."""
    headers = message.headers or {}
    reason = _text(headers.get(REASON_HEADER))
    dead_lettered_at = headers.get(DEAD_LETTERED_AT_HEADER)
    by = "consumer"
    if reason is None:
        by = "broker"
        death = _first_death(headers)
        reason = _text(death.get("reason")) or "unknown"
        dead_lettered_at = death.get("time")

    return DeadLetter(
        message_id=message.message_id,
        routing_key=message.routing_key or "",
        correlation_id=message.correlation_id,
        reason=reason,
        dead_lettered_by=by,
        dead_lettered_at=(
            dead_lettered_at if isinstance(dead_lettered_at, datetime) else None
        ),
        body_bytes=len(message.body),
    )


async def list_dead_letters(
    amqp_url: str, prefix: str, limit: int | None = None
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters, oldest first; the queue is left as it was."""
    names = TopologyNames.for_prefix(prefix)
    async with _channel(amqp_url) as channel:
        queue = await _dead_letter_queue(channel, names)
        found = []
        async for message in _held_messages(queue):
            found.append(describe(message))
            if limit is not None and len(found) >= limit:
                break
        return found


async def replay_dead_letters(
    amqp_url: str, prefix: str, message_ids: Collection[str] | None
) -> ReplayResult:
    """Republish the dead letters with ``message_ids`` (all when None).

    Every copy of a chosen id is replayed. Raises ``DeadLetterQueueError`` if
    the broker refuses a message; those replayed before it stay replayed.
    """
    names = TopologyNames.for_prefix(prefix)
    wanted = None if message_ids is None else set(message_ids)
    result = ReplayResult()

    async with _channel(amqp_url) as reading, _channel(amqp_url) as publishing:
        queue = await _dead_letter_queue(reading, names)
        try:
            events = await publishing.get_exchange(names.events_exchange, ensure=True)
        except aio_pika.exceptions.ChannelClosed as exc:
            raise DeadLetterQueueError(
                f"no exchange {names.events_exchange}: {exc}"
            ) from exc

        async for message in _held_messages(queue):
            if wanted is not None and message.message_id not in wanted:
                continue

            headers = {
                name: value
                for name, value in (message.headers or {}).items()
                if name not in DEAD_LETTER_HEADERS
            }
            routing_key = message.routing_key or ""
            try:
                await events.publish(
                    copy_message(message, headers),
                    routing_key=routing_key,
                    mandatory=True,
                    timeout=CONFIRM_TIMEOUT_SECONDS,
                )
            except (aio_pika.exceptions.AMQPError, TimeoutError) as exc:
                raise DeadLetterQueueError(
                    f"message {message.message_id} was not replayed: {exc}"
                ) from exc
            # Only now that the broker holds the replayed copy.
            await message.ack()
            result.replayed.append(message.message_id or "")

    if wanted is not None:
        result.missing = sorted(wanted - set(result.replayed))
    return result


@asynccontextmanager
async def _channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    try:
        connection = await aio_pika.connect(amqp_url)
    except (aio_pika.exceptions.AMQPError, OSError) as exc:
        raise DeadLetterQueueError(f"cannot reach the broker: {exc}") from exc
    async with connection:
        yield await connection.channel(publisher_confirms=True)


async def _dead_letter_queue(
    channel: AbstractChannel, names: TopologyNames
) -> AbstractQueue:
    try:
        return await channel.get_queue(names.dead_letter_queue, ensure=True)
    except aio_pika.exceptions.ChannelClosed as exc:
        raise DeadLetterQueueError(
            f"no queue {names.dead_letter_queue} (has a consumer run yet?): {exc}"
        ) from exc


async def _held_messages(
    queue: AbstractQueue,
) -> AsyncIterator[AbstractIncomingMessage]:
    """Each message in the queue once, left un-acked for the caller to settle.

    Only the messages present when reading starts are read: a replayed message
    that is dead-lettered again meanwhile joins the tail of the queue, and
    must not be picked up (and replayed) a second time in the same run.
    """
    underlay = await queue.channel.get_underlay_channel()
    declared = await underlay.queue_declare(queue.name, passive=True)
    present = declared.message_count or 0
    for _ in range(present):
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            return
        yield message


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    return None
