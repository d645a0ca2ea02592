"""Dead letters: messages no delivery can process, kept with the reason why.

Two ways lead to ``{prefix}.dead-letter``:

* The consumer finds a message unprocessable (not JSON, no ``message_id``, an
  unknown task type, a task that does not exist). It publishes a copy to the
  dead-letter exchange itself, with the header ``x-dead-letter-reason``, waits
  for the broker's confirm, and only then acks the original. A crash in
  between leaves the original un-acked, so a message can be dead-lettered
  twice but is never lost.
* The broker dead-letters a message delivered more than
  ``CONSUMER_DELIVERY_LIMIT`` times (a handler that kills its consumer every
  time). It adds its own ``x-death`` header, whose reason is
  ``delivery_limit``.

A copy keeps the original routing key and properties, so ``python -m
consumer dead-letters replay`` can publish it to the events exchange exactly
as the relay once did (see :mod:`consumer.dead_letter_queue`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractMessage,
)

from consumer.errors import ConsumerError

#: Why the consumer dead-lettered a message: a short phrase, never the body.
REASON_HEADER = "x-dead-letter-reason"
#: When the consumer dead-lettered it (an AMQP timestamp).
DEAD_LETTERED_AT_HEADER = "x-dead-lettered-at"

#: Headers the broker or the consumer add on the way to the dead-letter queue,
#: dropped when a message is replayed so that it starts afresh.
DEAD_LETTER_HEADERS = frozenset(
    {
        REASON_HEADER,
        DEAD_LETTERED_AT_HEADER,
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)

#: Seconds to wait for the broker to confirm a dead letter.
CONFIRM_TIMEOUT_SECONDS = 10.0


class DeadLetterError(ConsumerError):
    """The broker did not confirm a dead letter; the original stays un-acked."""


def copy_message(
    message: AbstractMessage, headers: Mapping[str, Any]
) -> aio_pika.Message:
    """A persistent copy of ``message`` with ``headers`` instead of its own.

    ``expiration`` is dropped so that a copy never expires in a queue, and
    ``user_id`` because the broker refuses one that names another user.
    """
    return aio_pika.Message(
        body=message.body,
        headers=dict(headers),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


class DeadLetterPublisher:
    """Publishes dead letters over a confirming channel of its own."""

    def __init__(self, channel: AbstractChannel, exchange: AbstractExchange) -> None:
        self._channel = channel
        self._exchange = exchange

    @classmethod
    async def open(
        cls, connection: AbstractConnection, exchange_name: str
    ) -> DeadLetterPublisher:
        """Open the channel; the exchange must exist (the topology declares it)."""
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name, ensure=True)
        return cls(channel, exchange)

    async def publish(
        self, message: AbstractMessage, routing_key: str, reason: str
    ) -> None:
        """Publish a copy of ``message`` with ``reason``; return once confirmed.

        The exchange is a fanout, so ``routing_key`` does not route; it is
        kept for the replay. Raises :class:`DeadLetterError` if the broker
        does not take the copy.
        """
        headers = {
            **(message.headers or {}),
            REASON_HEADER: reason,
            DEAD_LETTERED_AT_HEADER: datetime.now(UTC),
        }
        try:
            await self._exchange.publish(
                copy_message(message, headers),
                routing_key=routing_key,
                mandatory=True,
                timeout=CONFIRM_TIMEOUT_SECONDS,
            )
        except (aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
            raise DeadLetterError(f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise DeadLetterError("the broker did not confirm in time") from exc

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()
