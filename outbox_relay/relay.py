"""The relay loop: claim due outbox rows, publish them, mark the outcome.

One pass claims a batch (a committed lease, see :mod:`outbox_relay.queries`),
publishes it with confirms, and settles it: confirmed rows are marked
published in one statement, failed rows get an attempt and a back-off, rows
the connection dropped are handed back without counting. A full batch, or
one during which a NOTIFY arrived, is followed at once by another pass;
otherwise the relay sleeps until a NOTIFY, the next row's due time or the
poll interval, whichever comes first.

A batch the broker confirmed whole is marked in the background while the next
pass claims and publishes, so the database's work on one batch overlaps the
broker's on the next. At most one such mark runs, and it commits before the
next batch is marked, so batches are settled in the order they were
published. This cannot reorder a key's rows: until a row is marked, the claim
still sees it as its key's oldest unpublished row and takes none behind it.
A batch with anything but confirms (failures, releases) is settled before
the pass ends, as are the batches an outage left unsettled.

A message that makes the broker close the channel fails every message then
in flight on it. Those rows are released without counting an attempt and
remembered as suspects; the next pass publishes each suspect alone, so only
the one that closes the channel again has an attempt counted (and, after
``RELAY_MAX_ATTEMPTS``, is parked), while the others go out.

Delivery is at least once. A relay that dies after the broker confirmed but
before the mark commits publishes those rows again after the lease; consumers
deduplicate by ``message_id``. Rows that share a ``correlation_id`` reach the
broker in id order, however many relays run: the claim only takes the oldest
unpublished, live row of each key (see :data:`outbox_relay.queries.CLAIM_BATCH`).
Rows without one are published in no particular order.

Each batch is one INFO line naming the request ids and trace ids of the rows
it published (at most :data:`MAX_LOGGED_IDS` of each), so a request can be
followed from the API's log through the relay's to the consumer's; at DEBUG
every row gets a line of its own. Side loops: the LISTEN connection and a
sampler that keeps the backlog gauges current (see :mod:`outbox_relay.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from outbox_relay import metrics
from outbox_relay.errors import BrokerUnavailableError, DatabaseUnavailableError
from outbox_relay.listener import NotificationListener
from outbox_relay.outbox import NOTIFY_CHANNEL
from outbox_relay.publisher import BatchOutcome, OutboxPublisher
from outbox_relay.queries import OutboxRow
from outbox_relay.resilience import DependencyHealth, retry_delay, wait_first
from outbox_relay.settings import RelaySettings
from outbox_relay.store import FailedRow, OutboxStore, RowFailure

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

#: Request ids and trace ids named in one batch's log line, each at most; the
#: DEBUG line of each row names the rest.
MAX_LOGGED_IDS = 50

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header; None if it is not one."""
    if traceparent is None:
        return None
    match = _TRACEPARENT.match(traceparent.strip())
    return match.group(1) if match else None


@dataclass(slots=True)
class _PublishedBatch:
    """A batch the broker has answered for but the database not yet heard of."""

    rows: list[OutboxRow]
    outcome: BatchOutcome
    #: ``time.monotonic()`` before the claim, for the batch's duration.
    started: float
    #: When the broker's answers were in: the end of each row's publish latency.
    confirmed_at: datetime


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
        #: Batches the broker answered for and the database has not yet
        #: heard of, oldest first. Kept until settled: if the database goes
        #: away, the next pass marks them first instead of letting their
        #: lease expire and publishing them a second time.
        self._unsettled: list[_PublishedBatch] = []
        #: The background settle of the last pass's batch, if any.
        self._settling: asyncio.Task[None] | None = None
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
            settings.database_url,
            f"outbox_relay listen {settings.relay_name}",
            NOTIFY_CHANNEL,
            on_notify=lambda _payload: self._wakeup.set(),
            # Rows inserted while nobody listened woke no one.
            on_listening=self._wakeup.set,
        )
        listener_stop = asyncio.Event()
        listener_task = asyncio.create_task(
            listener.run(listener_stop), name="outbox-relay-listen"
        )
        sampler_task = asyncio.create_task(
            self._sample_backlog(store, listener_stop),
            name="outbox-relay-backlog-sampler",
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
            side_tasks = {listener_task, sampler_task}
            await asyncio.wait(side_tasks, timeout=LISTENER_STOP_SECONDS)
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            await self._shutdown(store)

    async def _loop(self, store: OutboxStore, stop: asyncio.Event) -> None:
        while not stop.is_set():
            publisher = await self._ready_publisher(stop)
            if publisher is None:
                continue

            try:
                if self._settling is None or self._settling.done():
                    # Only does something after an outage interrupted a settle.
                    await self._catch_up(store)
                full, broker_error = await self._pass(store, publisher)
                self._database.up()

                if broker_error is None:
                    self._broker.up()
                    # More rows were committed during the pass (a NOTIFY came):
                    # the next pass claims them at once, while this batch is
                    # still being marked, as after a full batch.
                    if not full and not self._wakeup.is_set():
                        # Nothing stays leased (or unlogged) while idle.
                        await self._catch_up(store)
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
        """Claim, publish and settle one batch (in the background when the
        broker confirmed all of it).

        Returns whether the batch was full (more may be due) and the broker
        error that interrupted it, if any.
        """
        # Cleared before the claim, so a NOTIFY that arrives while this batch
        # is in flight makes the next idle wait return at once.
        self._wakeup.clear()
        started = time.monotonic()
        # The previous batch may still be being marked meanwhile.
        rows = await store.claim(
            self._settings.relay_batch_size, self._settings.relay_lease_seconds
        )
        if not rows:
            return False, None

        outcome = await self._publish(publisher, rows)
        self._unsettled.append(
            _PublishedBatch(rows, outcome, started, confirmed_at=datetime.now(UTC))
        )
        await self._settled_behind()
        if len(outcome.published) == len(rows):
            self._settling = asyncio.create_task(
                self._settle_behind(store), name="outbox-relay-settle"
            )
        else:
            await self._settle_all(store)

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

    async def _catch_up(self, store: OutboxStore) -> None:
        """Wait for the background settle, then settle what is still unsettled."""
        await self._settled_behind()
        await self._settle_all(store)

    async def _settled_behind(self) -> None:
        """Wait for the background settle, if one runs."""
        settling, self._settling = self._settling, None
        if settling is not None:
            await settling

    async def _settle_all(self, store: OutboxStore) -> None:
        """Settle the unsettled batches, oldest first."""
        while self._unsettled:
            await self._settle(store, self._unsettled[0])

    async def _settle_behind(self, store: OutboxStore) -> None:
        """:meth:`_settle_all` in the background. An outage leaves the batches
        unsettled for the loop, whose next statement meets the outage too and
        reports it; any other error surfaces where this task is awaited."""
        with contextlib.suppress(DatabaseUnavailableError):
            await self._settle_all(store)

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
        self._unsettled.remove(batch)

        # Counted only now that every statement went through: a settle that
        # failed half-way is repeated in full, and must not count twice.
        self._count(batch, failures, recorded)

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

        published = set(outcome.published)
        published_rows = [row for row in batch.rows if row.id in published]
        for sent in published_rows:
            self._log.debug(
                "outbox_row_published",
                id=sent.id,
                routing_key=sent.routing_key,
                correlation_id=sent.correlation_id,
                request_id=sent.request_id,
                trace_id=trace_id_of(sent.traceparent),
            )
        self._log.info(
            "outbox_batch_published",
            count=len(outcome.published),
            failed=len(outcome.failed),
            released=len(outcome.unsent) + len(outcome.suspect),
            duration_ms=round((time.monotonic() - batch.started) * 1000, 1),
            request_ids=_first_distinct(sent.request_id for sent in published_rows),
            trace_ids=_first_distinct(
                trace_id_of(sent.traceparent) for sent in published_rows
            ),
        )

    def _count(
        self,
        batch: _PublishedBatch,
        failures: list[RowFailure],
        recorded: list[FailedRow],
    ) -> None:
        """Add a settled batch to the Prometheus metrics."""
        outcome = batch.outcome
        published = set(outcome.published)
        for row in batch.rows:
            if row.id in published:
                metrics.PUBLISHED.labels(routing_key=row.routing_key).inc()
                latency = (batch.confirmed_at - row.created_at).total_seconds()
                # The database's clock wrote created_at, ours the confirm:
                # a little skew must not make a latency negative.
                metrics.PUBLISH_LATENCY.observe(max(latency, 0.0))

        routing_keys = {row.id: row.routing_key for row in batch.rows}
        for failure in failures:
            error = outcome.failed[failure.id]
            metrics.FAILED.labels(reason=error.reason).inc()
            if error.reason == "returned":
                metrics.RETURNED.labels(routing_key=routing_keys[failure.id]).inc()
        metrics.DEAD.inc(sum(1 for failed in recorded if failed.dead))
        metrics.BATCH_DURATION.observe(time.monotonic() - batch.started)

    async def _sample_backlog(self, store: OutboxStore, stop: asyncio.Event) -> None:
        """Keep the backlog gauges current until ``stop`` is set.

        A failed sample leaves the gauges as they were; the relay loop reports
        the outage, so this loop only notes it at DEBUG.
        """
        interval = self._settings.relay_lag_sample_seconds
        while not stop.is_set():
            try:
                summary = await store.pending_summary()
            except DatabaseUnavailableError as exc:
                self._log.debug("outbox_backlog_sample_failed", error=str(exc))
            except Exception:
                # A fault, not an outage; the gauges go stale but rows keep
                # moving, so it is reported and the next sample tries again.
                self._log.exception("outbox_backlog_sample_failed")
            else:
                metrics.PENDING.set(summary.pending)
                metrics.OLDEST_PENDING_AGE.set(summary.oldest_age_seconds)
                metrics.LONGEST_DUE.set(summary.longest_due_seconds)
                self._log.debug(
                    "outbox_backlog_sampled",
                    pending=summary.pending,
                    oldest_age_seconds=round(summary.oldest_age_seconds, 3),
                )
            await wait_first(stop.wait(), at_most=interval)

    async def _idle(self, store: OutboxStore, stop: asyncio.Event) -> None:
        """Sleep until a NOTIFY, the next due row or the poll interval."""
        if self._wakeup.is_set():
            return
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
        try:
            await self._catch_up(store)
        except DatabaseUnavailableError as exc:
            self._log.warning(
                "outbox_batch_unsettled",
                count=sum(len(batch.rows) for batch in self._unsettled),
                error=str(exc),
            )

        if self._publisher is not None:
            await self._publisher.close()
        await store.close()
        self._log.info("outbox_relay_stopped")


def _first_distinct(values: Iterable[str | None]) -> list[str]:
    """Up to :data:`MAX_LOGGED_IDS` distinct values, in order, without None."""
    seen: dict[str, None] = {}
    for value in values:
        if value is not None:
            seen[value] = None
            if len(seen) >= MAX_LOGGED_IDS:
                break
    return list(seen)
