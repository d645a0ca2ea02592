"""The relay loop: claim due outbox rows, publish them, mark the outcome.

One pass claims a batch (a committed lease, see :mod:`outbox_relay.queries`),
publishes it with confirms, and settles it: confirmed rows are marked
published in one statement, failed rows get an attempt and a back-off, rows
the connection dropped are handed back without counting. A full batch is
followed at once by another pass; otherwise the relay sleeps until a NOTIFY, the
next row's due time or the poll interval, whichever comes first.

A message that makes the broker close the channel fails every message then
in flight on it. Those rows are released without counting an attempt and
remembered as suspects; the next pass publishes each suspect alone, so only
the one that closes the channel again has an attempt counted (and, after
``RELAY_MAX_ATTEMPTS``, is parked), while the others go out.

Delivery is at least once. A relay that dies after the broker confirmed but
before the mark commits publishes those rows again after the lease; consumers
deduplicate by ``message_id``. Within a batch messages reach the broker in id
order, but retries and concurrent relays make no promise of order overall.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog

from outbox_relay.errors import BrokerUnavailableError, DatabaseUnavailableError
from outbox_relay.listener import NotificationListener
from outbox_relay.publisher import BatchOutcome, OutboxPublisher
from outbox_relay.queries import OutboxRow
from outbox_relay.resilience import DependencyHealth, retry_delay, wait_first
from outbox_relay.settings import RelaySettings
from outbox_relay.store import OutboxStore, RowFailure

log = structlog.get_logger(__name__)

#: Shortest sleep between passes that found no full batch, so rows that are
#: due but still locked by another relay's claim cannot make this loop spin.
MIN_IDLE_SECONDS = 0.05

#: Longest single wait for the broker connection to come back before the loop
#: looks at the stop event and the connection again.
BROKER_WAIT_SECONDS = 5.0

#: How long the LISTEN side may take to close when the relay stops.
LISTENER_STOP_SECONDS = 2.0

#: ``last_error`` keeps the start of a failure's description, not a novel.
MAX_ERROR_LENGTH = 1000

#: Suspects published alone in one pass at most, each waiting for its own
#: confirm; more are handed back for the next pass, so a pass stays well
#: within the lease.
MAX_ISOLATED_PER_PASS = 32

#: Suspects remembered at most; beyond it the oldest are forgotten (another
#: relay may have published them meanwhile, and they would never be seen).
MAX_SUSPECTS = 10_000


@dataclass(slots=True)
class _PublishedBatch:
    """A batch the broker has answered for but the database not yet heard of."""

    rows: list[OutboxRow]
    outcome: BatchOutcome
    started: float


class OutboxRelay:
    """Moves outbox rows to RabbitMQ until a stop event is set.

    Usable as the whole process (``python -m outbox_relay``) or in-process, as
    the tests do: ``await OutboxRelay(settings).run(stop)``. A ``store`` or
    ``publisher`` passed in is used instead of connecting with ``settings``,
    and is closed when the relay stops.
    """

    def __init__(
        self,
        settings: RelaySettings,
        *,
        store: OutboxStore | None = None,
        publisher: OutboxPublisher | None = None,
    ) -> None:
        self._settings = settings
        self._log = log.bind(relay=settings.relay_name)
        self._wakeup = asyncio.Event()
        self._database = DependencyHealth("database")
        self._broker = DependencyHealth("broker")
        self._store = store
        self._publisher = publisher
        self._unsettled: _PublishedBatch | None = None
        #: Rows in flight when the broker closed the channel; published one at
        #: a time when next claimed. Insertion-ordered, so the oldest go first
        #: when the set is trimmed.
        self._suspects: dict[int, None] = {}

    @property
    def is_ready(self) -> bool:
        """Whether rows can move now: database and broker both reachable.

        Meant for a readiness probe; the LISTEN connection does not count,
        since polling keeps rows moving without it.
        """
        return (
            self._publisher is not None
            and self._publisher.is_ready
            and not self._broker.is_down
            and not self._database.is_down
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set, then finish the batch in hand and close.

        Losing PostgreSQL or RabbitMQ is waited out with back-off; any other
        error ends the relay and propagates.
        """
        settings = self._settings
        store = self._store
        if store is None:
            store = await OutboxStore.open(settings.database_url, settings.relay_name)
        listener = NotificationListener(
            settings.database_url, settings.relay_name, self._wakeup
        )
        listener_stop = asyncio.Event()
        listener_task = asyncio.create_task(
            listener.run(listener_stop), name="outbox-relay-listen"
        )
        self._log.info(
            "outbox_relay_started",
            prefix=settings.amqp_prefix,
            batch_size=settings.relay_batch_size,
        )

        try:
            await self._loop(store, stop)
        finally:
            # The listener holds nothing worth finishing: it gets a moment to
            # close its connection politely, and is cancelled if it is stuck
            # connecting to a server that does not answer.
            listener_stop.set()
            await asyncio.wait({listener_task}, timeout=LISTENER_STOP_SECONDS)
            listener_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener_task
            await self._shutdown(store)

    async def _loop(self, store: OutboxStore, stop: asyncio.Event) -> None:
        while not stop.is_set():
            publisher = await self._ready_publisher(stop)
            if publisher is None:
                continue

            try:
                if self._unsettled is not None:
                    await self._settle(store, self._unsettled)
                full, broker_error = await self._pass(store, publisher)
                self._database.up()

                if broker_error is None:
                    self._broker.up()
                    if not full:
                        await self._idle(store, stop)
            except DatabaseUnavailableError as exc:
                await self._pause(stop, self._database.down(exc))
                continue

            if broker_error is not None:
                await self._pause(stop, self._broker.down(broker_error))

    async def _ready_publisher(self, stop: asyncio.Event) -> OutboxPublisher | None:
        """The publisher if the broker is reachable now, else None after a wait.

        No row is claimed while the broker is away: a claim would only lease
        rows that then sit out the lease.
        """
        if self._publisher is None:
            try:
                self._publisher = await OutboxPublisher.connect(
                    self._settings.amqp_url,
                    self._settings.amqp_prefix,
                    publish_timeout=self._settings.relay_publish_timeout,
                    connection_name=f"outbox_relay {self._settings.relay_name}",
                    max_message_bytes=self._settings.relay_max_message_bytes,
                )
            except BrokerUnavailableError as exc:
                await self._pause(stop, self._broker.down(exc))
                return None

        if self._publisher.is_ready:
            return self._publisher

        if self._publisher.is_connected:
            # Only the channel is gone: the broker closed it over a message,
            # and the client is reopening it. Not an outage unless it lasts.
            await wait_first(
                stop.wait(), self._publisher.wait_ready(), at_most=BROKER_WAIT_SECONDS
            )
            if self._publisher.is_ready:
                return self._publisher

        # The robust connection reconnects by itself; wait for it, not poll it.
        self._broker.down("connection lost")
        await wait_first(
            stop.wait(), self._publisher.wait_ready(), at_most=BROKER_WAIT_SECONDS
        )
        return None

    async def _pass(
        self, store: OutboxStore, publisher: OutboxPublisher
    ) -> tuple[bool, BrokerUnavailableError | None]:
        """Claim, publish and settle one batch.

        Returns whether the batch was full (more may be due) and the broker
        error that interrupted it, if any.
        """
        # Cleared before the claim, so a NOTIFY that arrives while this batch
        # is in flight makes the next idle wait return at once.
        self._wakeup.clear()
        rows = await store.claim(
            self._settings.relay_batch_size, self._settings.relay_lease_seconds
        )
        if not rows:
            return False, None

        started = time.monotonic()
        outcome = await self._publish(publisher, rows)
        # Kept until settled: if the database goes away now, the next pass
        # marks these rows first instead of letting their lease expire and
        # publishing them a second time.
        self._unsettled = _PublishedBatch(rows, outcome, started)
        await self._settle(store, self._unsettled)

        # Released suspects are due again at once and must not wait for the
        # poll interval: the next pass isolates them.
        full = len(rows) >= self._settings.relay_batch_size or bool(outcome.suspect)
        return full, outcome.broker_error

    async def _publish(
        self, publisher: OutboxPublisher, rows: list[OutboxRow]
    ) -> BatchOutcome:
        """Publish suspects one at a time, then the other rows as one batch.

        A suspect that makes the broker close the channel on its own is the
        row at fault and fails; rows that were merely in flight next to the
        culprit are released as suspects, with no attempt counted.
        """
        outcome = BatchOutcome()
        ordinary = [row for row in rows if row.id not in self._suspects]
        isolated = [row for row in rows if row.id in self._suspects]

        for index, row in enumerate(isolated):
            if outcome.broker_error is not None:
                outcome.add_unsent(row.id, outcome.broker_error)
                continue
            if index >= MAX_ISOLATED_PER_PASS:
                outcome.unsent.append(row.id)
                continue

            alone = await publisher.publish_batch([row])
            if row.id in alone.suspect:
                outcome.failed[row.id] = alone.suspect.pop(row.id)
            outcome.merge(alone)
            if row.id not in outcome.unsent:
                del self._suspects[row.id]

        broker_error = outcome.broker_error
        if broker_error is not None:
            for row in ordinary:
                outcome.add_unsent(row.id, broker_error)
        elif ordinary:
            outcome.merge(await publisher.publish_batch(ordinary))

        if outcome.suspect:
            self._log.warning(
                "outbox_channel_closed",
                suspects=len(outcome.suspect),
                reason=str(next(iter(outcome.suspect.values())))[:MAX_ERROR_LENGTH],
            )
            for row_id in outcome.suspect:
                self._suspects[row_id] = None
            while len(self._suspects) > MAX_SUSPECTS:
                del self._suspects[next(iter(self._suspects))]
        return outcome

    async def _settle(self, store: OutboxStore, batch: _PublishedBatch) -> None:
        """Write a batch's outcome to the outbox; safe to repeat after a failure.

        Each statement only changes rows still unpublished (and, for failures
        and releases, still leased to this relay), so running it twice has
        the effect of running it once.
        """
        settings = self._settings
        outcome = batch.outcome
        attempts = {row.id: row.attempts for row in batch.rows}
        routing_keys = {row.id: row.routing_key for row in batch.rows}

        await store.mark_published(outcome.published)
        failures = [
            RowFailure(
                id=row_id,
                error=str(error)[:MAX_ERROR_LENGTH],
                retry_in_seconds=retry_delay(
                    attempts[row_id],
                    settings.relay_retry_base_seconds,
                    settings.relay_retry_max_seconds,
                ),
            )
            for row_id, error in outcome.failed.items()
        ]
        recorded = await store.mark_failed(failures, settings.relay_max_attempts)
        await store.release([*outcome.unsent, *outcome.suspect])
        self._unsettled = None

        for failure in failures:
            self._log.warning(
                "outbox_publish_failed",
                id=failure.id,
                routing_key=routing_keys[failure.id],
                attempt=attempts[failure.id] + 1,
                reason=failure.error,
            )
        for row in recorded:
            if row.dead:
                self._log.error(
                    "outbox_row_dead",
                    id=row.id,
                    routing_key=row.routing_key,
                    attempts=row.attempts,
                    reason=str(outcome.failed[row.id])[:MAX_ERROR_LENGTH],
                )
        self._log.info(
            "outbox_batch_published",
            count=len(outcome.published),
            failed=len(outcome.failed),
            released=len(outcome.unsent) + len(outcome.suspect),
            duration_ms=round((time.monotonic() - batch.started) * 1000, 1),
        )

    async def _idle(self, store: OutboxStore, stop: asyncio.Event) -> None:
        """Sleep until a NOTIFY, the next due row or the poll interval."""
        delay = self._settings.relay_poll_interval
        seconds_until_due = await store.seconds_until_next_due()
        if seconds_until_due is not None:
            delay = min(delay, seconds_until_due)

        await wait_first(
            stop.wait(),
            self._wakeup.wait(),
            at_most=max(delay, MIN_IDLE_SECONDS),
        )

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        await wait_first(stop.wait(), at_most=seconds)

    async def _shutdown(self, store: OutboxStore) -> None:
        """Settle what the broker confirmed if the database allows, then close."""
        if self._unsettled is not None:
            try:
                await self._settle(store, self._unsettled)
            except DatabaseUnavailableError as exc:
                self._log.warning(
                    "outbox_batch_unsettled",
                    count=len(self._unsettled.rows),
                    error=str(exc),
                )

        if self._publisher is not None:
            await self._publisher.close()
        await store.close()
        self._log.info("outbox_relay_stopped")
