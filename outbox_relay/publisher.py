"""Publishing outbox rows to RabbitMQ with publisher confirms.

A row counts as published only when the broker has acknowledged it: every
message is mandatory, so a message no queue would take comes back and fails
its row instead of vanishing. aio-pika's and aiormq's exceptions are
translated here and nowhere else; the relay sees a :class:`BatchOutcome` that
sorts the rows into published, failed (the message's problem, retried with
back-off) and unsent (the connection's problem, retried without counting).

A message can also make the broker close the channel (one over the broker's
``max_message_size``, say). Every message still unconfirmed on that channel
then fails with the same error, so the outcome lists them as *suspects*
rather than blaming them all; the relay publishes suspects one at a time to
find the one at fault. Oversized messages are refused here, before they reach
the broker, whenever the relay's ``RELAY_MAX_MESSAGE_BYTES`` is below the
broker's limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions
import msgspec
from aio_pika.abc import (
    AbstractExchange,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from outbox_relay.errors import (
    BrokerUnavailableError,
    ChannelClosedByBrokerError,
    PublishError,
)
from outbox_relay.queries import OutboxRow

_HEADERS = msgspec.json.Decoder(dict[str, Any])

#: Largest headers object (as stored JSON) a row may carry. AMQP sends the
#: headers in one frame, and the broker drops the whole connection over a
#: frame above its ``frame_max`` (128 KiB by default), which would look like
#: an outage instead of one row's fault.
MAX_HEADERS_BYTES = 64 * 1024

#: How often to look whether the client has reopened a channel the broker
#: closed; the robust channel does so within milliseconds.
CHANNEL_REOPEN_POLL_SECONDS = 0.05


def events_exchange_name(prefix: str) -> str:
    """The durable topic exchange every outbox row is published to."""
    return f"{prefix}.events"


@dataclass(slots=True)
class BatchOutcome:
    """What became of each row of a batch; every row is in exactly one group."""

    #: Confirmed by the broker.
    published: list[int] = field(default_factory=list)
    #: Refused, returned as unroutable, or not confirmed in time.
    failed: dict[int, PublishError] = field(default_factory=dict)
    #: Never settled because the connection or channel broke.
    unsent: list[int] = field(default_factory=list)
    #: Unconfirmed when the broker closed the channel because of one message;
    #: any of them may be the one, so none is blamed yet.
    suspect: dict[int, PublishError] = field(default_factory=dict)
    #: Why the rows in ``unsent`` were not sent.
    broker_error: BrokerUnavailableError | None = None

    def add_unsent(self, row_id: int, error: BrokerUnavailableError) -> None:
        self.unsent.append(row_id)
        self.broker_error = error

    def merge(self, other: BatchOutcome) -> None:
        """Add ``other``'s rows to this outcome (for rows published apart)."""
        self.published.extend(other.published)
        self.failed.update(other.failed)
        self.unsent.extend(other.unsent)
        self.suspect.update(other.suspect)
        if other.broker_error is not None:
            self.broker_error = other.broker_error


def build_message(
    row: OutboxRow, *, max_body_bytes: int | None = None
) -> aio_pika.Message:
    """The AMQP message for ``row``.

    Raises ``PublishError`` for headers that are not a JSON object or too
    large, and for a body over ``max_body_bytes``: the row's own faults,
    which no broker would accept.
    """
    if len(row.headers) > MAX_HEADERS_BYTES:
        raise PublishError(
            f"headers of {len(row.headers)} bytes are over {MAX_HEADERS_BYTES}",
            reason="invalid_headers",
        )
    try:
        headers = _HEADERS.decode(row.headers)
    except msgspec.DecodeError as exc:
        raise PublishError(
            f"headers are not a JSON object: {exc}", reason="invalid_headers"
        ) from exc

    body = row.body.encode()
    if max_body_bytes is not None and len(body) > max_body_bytes:
        raise PublishError(
            f"oversize: body of {len(body)} bytes is over"
            f" RELAY_MAX_MESSAGE_BYTES ({max_body_bytes})",
            reason="oversize",
        )

    return aio_pika.Message(
        body=body,
        message_id=str(row.id),
        correlation_id=row.correlation_id,
        type=row.routing_key,
        timestamp=row.created_at,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers=headers,
    )


class OutboxPublisher:
    """One robust connection and one confirming channel to the events exchange.

    The robust connection reconnects by itself and re-declares the exchange;
    :attr:`is_ready` tells the relay whether claiming rows makes sense now.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        exchange: AbstractExchange,
        publish_timeout: float,
        max_message_bytes: int | None = None,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._exchange = exchange
        self._publish_timeout = publish_timeout
        self._max_message_bytes = max_message_bytes

    @classmethod
    async def connect(
        cls,
        amqp_url: str,
        prefix: str,
        *,
        publish_timeout: float,
        connection_name: str,
        max_message_bytes: int | None = None,
    ) -> OutboxPublisher:
        """Connect, open a confirming channel and declare the exchange.

        Raises ``BrokerUnavailableError`` when the broker cannot be reached;
        after this first success, reconnection is the connection's business.
        """
        try:
            connection = await aio_pika.connect_robust(
                amqp_url,
                timeout=publish_timeout,
                client_properties={"connection_name": connection_name},
            )
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailableError(_describe(exc)) from exc

        try:
            channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            exchange = await channel.declare_exchange(
                events_exchange_name(prefix),
                aio_pika.ExchangeType.TOPIC,
                durable=True,
            )
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
            await connection.close()
            raise BrokerUnavailableError(_describe(exc)) from exc

        return cls(connection, channel, exchange, publish_timeout, max_message_bytes)

    @property
    def is_ready(self) -> bool:
        """Connected with an open channel, as far as the client knows."""
        return (
            self._connection.connected.is_set()
            and not self._connection.is_closed
            and not self._channel.is_closed
        )

    @property
    def is_connected(self) -> bool:
        """The connection is up, whatever became of the channel."""
        return self._connection.connected.is_set() and not self._connection.is_closed

    async def wait_ready(self) -> None:
        """Return once the connection and channel are restored.

        The robust channel's own ready signal can be set while a channel the
        broker closed is still being reopened, so readiness is checked as
        well, at short intervals.
        """
        while not self.is_ready:
            await self._channel.ready()
            if not self.is_ready:
                await asyncio.sleep(CHANNEL_REOPEN_POLL_SECONDS)

    async def publish_batch(self, rows: Sequence[OutboxRow]) -> BatchOutcome:
        """Publish ``rows`` concurrently and wait for each one's confirm.

        Messages go out in the order of ``rows`` over one channel, so the
        broker receives them in that order. The whole batch is bounded by the
        publish timeout even if the client waits for a reconnection, so the
        relay's lease on the rows cannot run out while they are in flight.
        """
        outcome = BatchOutcome()
        if not rows:
            return outcome

        deadline = asyncio.get_running_loop().time() + self._publish_timeout
        if self.is_connected and not self.is_ready:
            # The broker closed the channel (a message it refused); the client
            # reopens it at once, so wait for that rather than fail the batch.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait_ready(), self._publish_timeout)

        # One task per message, unnamed and without a timeout of its own:
        # the deadline below bounds them all, at a fraction of the cost.
        tasks = {row.id: asyncio.create_task(self._publish_one(row)) for row in rows}
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        _, pending = await asyncio.wait(tasks.values(), timeout=remaining)
        for task in pending:
            task.cancel()
        # Cancelled tasks must finish before the batch is settled, so no
        # late confirm is still running when the rows are marked.
        await asyncio.gather(*pending, return_exceptions=True)

        for row_id, task in tasks.items():
            if task in pending:
                self._timed_out(outcome, row_id)
                continue

            error = task.result()
            if error is None:
                outcome.published.append(row_id)
            elif isinstance(error, BrokerUnavailableError):
                outcome.add_unsent(row_id, error)
            elif isinstance(error, ChannelClosedByBrokerError):
                outcome.suspect[row_id] = error
            else:
                outcome.failed[row_id] = error
        return outcome

    async def close(self) -> None:
        # The connection is going away either way and nothing is in flight,
        # so a failure to close it politely changes nothing.
        with contextlib.suppress(*aio_pika.exceptions.CONNECTION_EXCEPTIONS):
            await self._connection.close()

    async def _publish_one(
        self, row: OutboxRow
    ) -> PublishError | BrokerUnavailableError | None:
        try:
            message = build_message(row, max_body_bytes=self._max_message_bytes)
        except PublishError as exc:
            return exc

        # Order matters: PublishError (returned) is a DeliveryError (nacked),
        # and both are AMQPErrors, which also cover a broken connection.
        try:
            await self._exchange.publish(
                message, routing_key=row.routing_key, mandatory=True
            )
        except aio_pika.exceptions.PublishError as exc:
            return PublishError(
                f"unroutable: returned by the broker ({exc})", reason="returned"
            )
        except aio_pika.exceptions.DeliveryError as exc:
            return PublishError(
                f"refused: the broker nacked it ({exc})", reason="nacked"
            )
        except aiormq.exceptions.ChannelClosed as exc:
            if _closed_by_broker(exc):
                return ChannelClosedByBrokerError(
                    f"the broker closed the channel: {_describe(exc)}"
                )
            return BrokerUnavailableError(_describe(exc))
        except TimeoutError:
            if not self.is_ready:
                return BrokerUnavailableError("connection lost while publishing")
            return PublishError(
                f"not confirmed within {self._publish_timeout:g} s", reason="timeout"
            )
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
            return BrokerUnavailableError(_describe(exc))
        return None

    def _timed_out(self, outcome: BatchOutcome, row_id: int) -> None:
        if self.is_ready:
            outcome.failed[row_id] = PublishError(
                f"not confirmed within {self._publish_timeout:g} s", reason="timeout"
            )
        else:
            outcome.add_unsent(
                row_id, BrokerUnavailableError("connection lost while publishing")
            )


def _closed_by_broker(exc: aiormq.exceptions.ChannelClosed) -> bool:
    # The client's own close ends in a bare ChannelClosed without a reply
    # code; the broker's Channel.Close carries one (406 for a message over
    # max_message_size) and usually maps to a subclass.
    if type(exc) is not aiormq.exceptions.ChannelClosed:
        return True
    return bool(exc.args) and exc.args[0] is not None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
