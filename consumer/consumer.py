"""The AMQP side of the consumer: subscribe, run deliveries concurrently, settle them.

Each delivery runs as its own named asyncio task, up to the prefetch at once.
A message is settled only after :class:`~consumer.processing.MessageProcessor`
returned, that is after its outcome committed:

* processed (any outcome) → ``ack``;
* unprocessable → a copy with its reason goes to the dead-letter exchange
  (confirmed), then ``ack`` (see :mod:`consumer.dead_letters`);
* database unreachable → nothing: the processor waits the outage out with
  the message un-acked (see :mod:`consumer.outage`), and if shutdown comes
  first the message is left for the broker to redeliver;
* an unexpected error (a bug) → ``nack`` with requeue after a back-off that
  grows with the broker's delivery count. Each requeue counts towards the
  queue's delivery limit, after which the broker dead-letters the message.

Alongside the deliveries run the cancellation watcher and the stuck-task
sweeper (see :mod:`consumer.sweeper`).

Each delivery runs in a span that continues the trace its headers carry (see
:mod:`service.tracing`); its log lines carry the message id, request id, task
id and trace id.

A delivery whose channel has closed (the robust connection reconnected in
between) is never settled on the new channel, where its delivery tag would
name a different message; the broker redelivers it instead, and the inbox
makes that redelivery harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal
from urllib.parse import urlsplit

import aio_pika
import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from consumer import metrics
from consumer.cancellation import CancellationWatcher
from consumer.dead_letters import DeadLetterError, DeadLetterPublisher
from consumer.errors import (
    ConsumerError,
    DatabaseUnavailableError,
    UnprocessableMessageError,
)
from consumer.messages import Delivery
from consumer.outage import DatabaseOutage
from consumer.processing import MessageProcessor
from consumer.settings import ConsumerSettings
from consumer.sweeper import StuckTaskSweeper
from consumer.topology import TopologyNames, declare_topology
from outbox_relay.config import sqlalchemy_url
from service.database import json_text
from service.registry import HandlerRegistry
from service.tracing import (
    create_tracer_provider,
    current_trace_id,
    extract_context,
    tracing_exported,
)

logger = structlog.get_logger(__name__)

#: First and longest wait before a message is requeued after an unexpected error.
REQUEUE_DELAY_BASE_SECONDS = 0.5
REQUEUE_DELAY_MAX_SECONDS = 30.0
#: Longest wait between attempts to reach the broker at start-up.
CONNECT_RETRY_MAX_SECONDS = 30.0
#: How long deliveries cancelled at the end of the shutdown grace get to unwind.
CANCEL_UNWIND_SECONDS = 5.0

_Settle = Literal["ack", "reject", "requeue"]


class TaskConsumer:
    """Consumes ``{prefix}.tasks`` until ``stop`` is set.

    Run it in-process with ``await TaskConsumer(settings, registry).run(stop)``;
    ``ready`` is set once the subscription is active. Spans go to
    ``tracer_provider`` if given, otherwise to a provider of the consumer's
    own that it shuts down when it stops.
    """

    def __init__(
        self,
        settings: ConsumerSettings,
        registry: HandlerRegistry,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._own_tracer_provider = tracer_provider is None
        self._tracer_provider = tracer_provider or create_tracer_provider(
            "outbox-tasks-consumer",
            export=tracing_exported(
                settings.otel_enabled, settings.otel_exporter_otlp_endpoint
            ),
        )
        self._tracer = self._tracer_provider.get_tracer(__name__)
        self._names = TopologyNames.for_prefix(settings.amqp_prefix)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._stop = asyncio.Event()
        #: Set when shutdown begins, however it began; cuts requeue waits short.
        self._stopping = asyncio.Event()
        self._processor: MessageProcessor | None = None
        self._dead_letters: DeadLetterPublisher | None = None
        self._outage = DatabaseOutage(self._stopping)
        #: Set when the consumer is subscribed and processing messages.
        self.ready = asyncio.Event()

    @property
    def is_ready(self) -> bool:
        """Subscribed, and the database answered last time it was asked."""
        return self.ready.is_set() and not self._outage.is_down

    @property
    def in_flight(self) -> int:
        """Deliveries received and not yet settled or abandoned."""
        return len(self._in_flight)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain and close.

        In-flight deliveries get ``consumer_shutdown_grace_seconds`` to finish;
        the rest are cancelled without being settled, and the broker
        redelivers them when the connection closes.
        """
        self._stop = stop
        engine = create_async_engine(
            sqlalchemy_url(self._settings.database_url),
            # Each delivery holds a connection only for its two short
            # transactions, so the pool can be smaller than the prefetch;
            # deliveries beyond it wait for a connection. No overflow: an
            # overflow connection is closed when it is returned, so under
            # steady load the pool would open a connection (a new PostgreSQL
            # backend) for most transactions.
            pool_size=min(self._settings.consumer_prefetch, 10),
            max_overflow=0,
            # No ping before each checkout (two round trips per message): a
            # connection that died with the database fails its statement,
            # SQLAlchemy then discards the whole pool, and the outage handling
            # retries the step on a fresh connection.
            pool_pre_ping=False,
            # Parameters carry results; they must not reach the logs.
            hide_parameters=True,
            json_serializer=json_text,
            connect_args={"timeout": 10},
        )
        try:
            connection = await self._connect()
            if connection is None:
                return
            try:
                await self._consume(connection, engine)
            finally:
                await connection.close()
        finally:
            await engine.dispose()
            if self._own_tracer_provider:
                # Flushes spans the exporter still holds; blocks briefly.
                await asyncio.to_thread(self._tracer_provider.shutdown)
            logger.info("consumer_stopped")

    async def _connect(self) -> AbstractRobustConnection | None:
        """Connect to the broker, retrying until it answers or stop is set."""
        delay = 1.0
        while not self._stop.is_set():
            try:
                return await aio_pika.connect_robust(
                    self._settings.amqp_url,
                    # Names the connection in the broker's tools, per deployment.
                    client_properties={
                        "connection_name": f"{self._settings.amqp_prefix}.consumer"
                    },
                )
            except (OSError, aiormq.exceptions.AMQPError) as exc:
                logger.warning(
                    "broker_connect_failed",
                    error=self._without_secrets(str(exc)),
                    retry_in=delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, CONNECT_RETRY_MAX_SECONDS)
        return None

    async def _consume(
        self, connection: AbstractRobustConnection, engine: AsyncEngine
    ) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self._settings.consumer_prefetch)
        topology = await declare_topology(
            channel,
            self._names,
            delivery_limit=self._settings.consumer_delivery_limit,
            task_events_max_length=self._settings.task_events_max_length,
        )

        self._dead_letters = await DeadLetterPublisher.open(
            connection, self._names.dead_letter_exchange
        )

        settings = self._settings
        watcher = CancellationWatcher(
            engine, settings.consumer_cancel_poll_interval, self._outage
        )
        self._processor = MessageProcessor(
            engine,
            self._registry,
            watcher,
            retry_backoff_base=settings.retry_backoff_base_seconds,
            retry_backoff_max=settings.retry_backoff_max_seconds,
            outage=self._outage,
            time_limit=settings.task_time_limit_seconds,
        )
        sweeper = StuckTaskSweeper(
            engine,
            self._registry,
            self._outage,
            default_limit=settings.task_time_limit_seconds,
            grace=settings.task_time_limit_grace_seconds,
            interval=settings.task_sweep_interval_seconds,
        )
        watcher_task = asyncio.create_task(
            watcher.run(), name="consumer-cancel-watcher"
        )
        stop_task = asyncio.create_task(self._stop.wait(), name="consumer-stop")
        sweeper.start()
        try:
            self._accepting = True
            consumer_tag = await topology.tasks.consume(self._on_message)
            logger.info(
                "consumer_started",
                queue=self._names.tasks_queue,
                prefetch=self._settings.consumer_prefetch,
            )
            self.ready.set()

            await asyncio.wait(
                {stop_task, watcher_task}, return_when=asyncio.FIRST_COMPLETED
            )
            logger.info("consumer_stopping", in_flight=len(self._in_flight))
            self._accepting = False
            self._stopping.set()
            try:
                await topology.tasks.cancel(consumer_tag)
            except (
                aiormq.exceptions.AMQPError,
                aiormq.exceptions.ChannelInvalidStateError,
                ConnectionError,
            ) as exc:
                # The broker is gone or the connection is being restored;
                # closing the connection ends the subscription just as well.
                logger.warning("consumer_cancel_failed", error=str(exc))
            await self._drain()
        finally:
            self._accepting = False
            self._stopping.set()
            # Batched statements still running finish before the pool closes.
            await self._processor.wait_idle()
            await sweeper.stop()
            stop_task.cancel()
            watcher_task.cancel()
            await asyncio.wait({stop_task, watcher_task})

        if not watcher_task.cancelled() and watcher_task.exception() is not None:
            raise ConsumerError("the cancellation watcher failed") from (
                watcher_task.exception()
            )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if not self._accepting:
            # Prefetched after shutdown began: left unsettled, the broker
            # redelivers it once this connection closes.
            return

        task = asyncio.create_task(
            self._handle(message), name=f"delivery:{message.message_id}"
        )
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        """Process one delivery and settle it; the task's context is its own."""
        assert self._processor is not None
        delivery = Delivery(
            message_id=message.message_id,
            routing_key=message.routing_key or "",
            body=message.body,
            headers=dict(message.headers or {}),
            redelivered=bool(message.redelivered),
        )
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            message_id=delivery.message_id, request_id=delivery.request_id
        )

        # The span continues the trace of the message's headers, or starts
        # one for a message without them; follow-up messages carry it on.
        with self._tracer.start_as_current_span(
            f"{delivery.routing_key or 'message'} process",
            context=extract_context(delivery.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.destination.name": self._names.tasks_queue,
                "messaging.rabbitmq.destination.routing_key": delivery.routing_key,
                "messaging.message.id": delivery.message_id or "",
            },
        ):
            structlog.contextvars.bind_contextvars(trace_id=current_trace_id())
            await self._process(message, delivery)

    async def _process(
        self, message: AbstractIncomingMessage, delivery: Delivery
    ) -> None:
        assert self._processor is not None
        try:
            await self._processor.process(delivery)
        except UnprocessableMessageError as exc:
            await self._dead_letter(message, delivery, exc)
            return
        except DatabaseUnavailableError as exc:
            # Only raised once shutdown began during an outage: the message
            # goes back to the queue when the connection closes, with nothing
            # of it committed.
            logger.info("message_left_for_redelivery", error=str(exc))
            return
        except Exception:
            # A bug or a statement the database refused: requeued like
            # database trouble, so the delivery limit ends a hopeless loop.
            logger.exception("message_processing_failed")
            await self._requeue_later(message, delivery, "processing failed")
            return

        await self._settle(message, "ack")

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        delivery: Delivery,
        error: UnprocessableMessageError,
    ) -> None:
        """Dead-letter with the reason attached; ack only once that is confirmed.

        If the copy cannot be published, the broker dead-letters the message
        instead (``reject``), without the reason but with its ``x-death``.
        """
        assert self._dead_letters is not None
        if not _channel_open(message):
            # Its channel is gone, so the message is back in the queue and
            # another delivery will dead-letter it.
            logger.warning("message_settle_skipped", action="dead-letter")
            return

        reason = error.reason
        metrics.DEAD_LETTERED.labels(reason=error.kind).inc()
        try:
            await self._dead_letters.publish(message, delivery.routing_key, reason)
        except DeadLetterError as exc:
            logger.error(
                "message_dead_lettered",
                reason=reason,
                routing_key=delivery.routing_key,
                by="broker",
                publish_error=str(exc),
            )
            await self._settle(message, "reject")
            return

        logger.error(
            "message_dead_lettered",
            reason=reason,
            routing_key=delivery.routing_key,
            by="consumer",
        )
        await self._settle(message, "ack")

    async def _requeue_later(
        self, message: AbstractIncomingMessage, delivery: Delivery, error: str
    ) -> None:
        delay = min(
            REQUEUE_DELAY_MAX_SECONDS,
            REQUEUE_DELAY_BASE_SECONDS * 2.0 ** min(delivery.delivery_count, 16),
        )
        logger.warning(
            "message_requeued",
            error=error,
            delivery_count=delivery.delivery_count,
            delay_seconds=delay,
        )
        # Holding the message for the delay keeps a database outage from
        # spinning through deliveries; shutdown cuts the wait short.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        await self._settle(message, "requeue")

    async def _settle(self, message: AbstractIncomingMessage, action: _Settle) -> None:
        if not _channel_open(message):
            logger.warning("message_settle_skipped", action=action, error="closed")
            return

        try:
            if action == "ack":
                await message.ack()
            elif action == "reject":
                await message.reject(requeue=False)
            else:
                await message.nack(requeue=True)
        except (
            aiormq.exceptions.ChannelInvalidStateError,
            aiormq.exceptions.AMQPError,
            ConnectionError,
        ) as exc:
            logger.warning("message_settle_skipped", action=action, error=str(exc))

    async def _drain(self) -> None:
        """Wait for in-flight deliveries, cancelling those that outlast the grace."""
        if not self._in_flight:
            return

        _, pending = await asyncio.wait(
            set(self._in_flight),
            timeout=self._settings.consumer_shutdown_grace_seconds,
        )
        if not pending:
            return

        logger.warning("consumer_shutdown_grace_expired", cancelled=len(pending))
        for task in pending:
            task.cancel()
        _, stuck = await asyncio.wait(pending, timeout=CANCEL_UNWIND_SECONDS)
        if stuck:
            logger.warning("consumer_deliveries_abandoned", count=len(stuck))

    def _without_secrets(self, text: str) -> str:
        password = urlsplit(self._settings.amqp_url).password
        return text.replace(password, "***") if password else text


def _channel_open(message: AbstractIncomingMessage) -> bool:
    try:
        return not message.channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:
        # aio-pika raises instead of answering once the channel has closed.
        return False
