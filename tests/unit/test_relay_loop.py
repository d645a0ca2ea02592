"""The relay loop against fakes of the outbox store and the publisher.

What the database and broker really do is the integration tests' business;
these pin down the loop's decisions: what is marked, failed or released, when
nothing is claimed, and that an outage is logged once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from structlog.testing import capture_logs

from outbox_relay.errors import (
    BrokerUnavailableError,
    ChannelClosedByBrokerError,
    DatabaseUnavailableError,
    PublishError,
)
from outbox_relay.publisher import BatchOutcome
from outbox_relay.queries import OutboxRow
from outbox_relay.relay import OutboxRelay
from outbox_relay.settings import RelaySettings
from outbox_relay.store import FailedRow, PendingSummary, RowFailure

Verdict = PublishError | BrokerUnavailableError | None


def make_rows(*ids: int) -> list[OutboxRow]:
    return [
        OutboxRow(
            id=row_id,
            routing_key="task.created",
            body="{}",
            headers="{}",
            correlation_id=None,
            created_at=datetime.now(UTC),
            attempts=0,
        )
        for row_id in ids
    ]


class FakeStore:
    """Rows in memory; ``fail_next`` makes the next calls of a method fail."""

    def __init__(self, rows: Sequence[OutboxRow]) -> None:
        self.pending = {row.id: row for row in rows}
        self.claims = 0
        self.published: list[int] = []
        self.failed: list[RowFailure] = []
        self.released: list[int] = []
        self.fail_next: dict[str, int] = {}
        #: Marks wait for this; cleared, they hang as a slow commit would.
        self.mark_gate = asyncio.Event()
        self.mark_gate.set()

    def _maybe_fail(self, method: str) -> None:
        if self.fail_next.get(method, 0) > 0:
            self.fail_next[method] -= 1
            raise DatabaseUnavailableError("connection refused")

    async def claim(self, limit: int, lease_seconds: float) -> list[OutboxRow]:
        self._maybe_fail("claim")
        self.claims += 1
        batch = list(self.pending.values())[:limit]
        for row in batch:
            del self.pending[row.id]
        return batch

    async def mark_published(self, ids: Sequence[int]) -> None:
        self._maybe_fail("mark_published")
        await self.mark_gate.wait()
        self.published.extend(i for i in ids if i not in self.published)

    async def mark_failed(
        self, failures: Sequence[RowFailure], max_attempts: int
    ) -> list[FailedRow]:
        self.failed.extend(failures)
        return [
            FailedRow(id=f.id, routing_key="task.created", attempts=1, dead=True)
            for f in failures
            if max_attempts <= 1
        ]

    async def release(self, ids: Sequence[int]) -> None:
        self.released.extend(ids)
        for row in make_rows(*ids):
            self.pending[row.id] = row

    async def seconds_until_next_due(self) -> float | None:
        return None

    async def pending_summary(self) -> PendingSummary:
        return PendingSummary(pending=len(self.pending), oldest_age_seconds=0.0)

    async def close(self) -> None:
        pass


class FakePublisher:
    """Decides each row's fate with ``verdict``; readiness is switchable."""

    def __init__(self, verdict: Callable[[OutboxRow], Verdict]) -> None:
        self.verdict = verdict
        self.batches: list[list[int]] = []
        self.ready = asyncio.Event()
        self.ready.set()
        self.gate = asyncio.Event()
        self.gate.set()
        self.closed = False

    @property
    def is_ready(self) -> bool:
        return self.ready.is_set()

    @property
    def is_connected(self) -> bool:
        return self.ready.is_set()

    async def wait_ready(self) -> None:
        await self.ready.wait()

    async def publish_batch(self, rows: Sequence[OutboxRow]) -> BatchOutcome:
        self.batches.append([row.id for row in rows])
        await self.gate.wait()
        outcome = BatchOutcome()
        for row in rows:
            verdict = self.verdict(row)
            if verdict is None:
                outcome.published.append(row.id)
            elif isinstance(verdict, BrokerUnavailableError):
                outcome.add_unsent(row.id, verdict)
            else:
                outcome.failed[row.id] = verdict
        return outcome

    async def close(self) -> None:
        self.closed = True


def settings(**overrides: Any) -> RelaySettings:
    values: dict[str, Any] = {
        # Nothing listens there: the LISTEN side is down throughout, which the
        # loop must not care about.
        "database_url": "postgresql://nobody@127.0.0.1:1/none",
        "relay_poll_interval": 0.05,
        "relay_retry_base_seconds": 1.0,
        "relay_retry_max_seconds": 10.0,
        "relay_name": "unit",
    }
    values.update(overrides)
    return RelaySettings(**values)


@asynccontextmanager
async def running(relay: OutboxRelay) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop), name="unit relay")
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def dependency_events(logs: list[MutableMapping[str, Any]], name: str) -> list[str]:
    return [
        e["event"]
        for e in logs
        if e["event"].startswith("outbox_dependency_") and e["dependency"] == name
    ]


async def test_confirmed_rows_are_marked_and_failed_ones_backed_off() -> None:
    store = FakeStore(make_rows(1, 2, 3))
    publisher = FakePublisher(
        lambda row: PublishError("unroutable") if row.id == 2 else None
    )
    relay = OutboxRelay(settings(), store=store, publisher=publisher)  # type: ignore[arg-type]

    with capture_logs() as logs:
        async with running(relay):
            await until(lambda: len(store.published) == 2 and len(store.failed) == 1)

    assert store.published == [1, 3]
    [failure] = store.failed
    assert failure.id == 2
    assert failure.error == "unroutable"
    assert 0.5 <= failure.retry_in_seconds <= 1.0
    assert store.released == []
    [batch] = [e for e in logs if e["event"] == "outbox_batch_published"]
    assert (batch["count"], batch["failed"], batch["released"]) == (2, 1, 0)
    assert [e["id"] for e in logs if e["event"] == "outbox_publish_failed"] == [2]
    assert publisher.closed


async def test_a_row_out_of_attempts_is_reported_dead() -> None:
    store = FakeStore(make_rows(7))
    publisher = FakePublisher(lambda row: PublishError("nacked"))
    relay = OutboxRelay(
        settings(relay_max_attempts=1),
        store=store,  # type: ignore[arg-type]
        publisher=publisher,  # type: ignore[arg-type]
    )

    with capture_logs() as logs:
        async with running(relay):
            await until(lambda: bool(store.failed))

    [dead] = [e for e in logs if e["event"] == "outbox_row_dead"]
    assert (dead["id"], dead["log_level"], dead["reason"]) == (7, "error", "nacked")


async def test_broken_connection_releases_rows_and_claims_nothing_until_back() -> None:
    store = FakeStore(make_rows(1, 2))
    publisher = FakePublisher(lambda row: None)

    def connection_drops(row: OutboxRow) -> Verdict:
        publisher.ready.clear()
        return BrokerUnavailableError("connection reset")

    publisher.verdict = connection_drops
    relay = OutboxRelay(settings(), store=store, publisher=publisher)  # type: ignore[arg-type]

    with capture_logs() as logs:
        async with running(relay):
            await until(lambda: store.released == [1, 2])
            claims = store.claims
            # Long enough for several passes had the relay not been waiting.
            await asyncio.sleep(0.3)
            assert store.claims == claims
            assert store.failed == []

            publisher.verdict = lambda row: None
            publisher.ready.set()
            await until(lambda: sorted(store.published) == [1, 2])

    assert dependency_events(logs, "broker") == [
        "outbox_dependency_down",
        "outbox_dependency_up",
    ]


async def test_database_outage_is_waited_out_and_logged_once() -> None:
    store = FakeStore(make_rows(1))
    store.fail_next["claim"] = 2
    relay = OutboxRelay(
        settings(),
        store=store,  # type: ignore[arg-type]
        publisher=FakePublisher(lambda row: None),  # type: ignore[arg-type]
    )

    with capture_logs() as logs:
        async with running(relay):
            await until(lambda: store.published == [1], within=10)

    assert dependency_events(logs, "database") == [
        "outbox_dependency_down",
        "outbox_dependency_up",
    ]


async def test_a_batch_confirmed_before_the_database_left_is_marked_first() -> None:
    store = FakeStore(make_rows(1))
    store.fail_next["mark_published"] = 1
    publisher = FakePublisher(lambda row: None)
    relay = OutboxRelay(settings(), store=store, publisher=publisher)  # type: ignore[arg-type]

    async with running(relay):
        await until(lambda: store.published == [1])

    # Marked from memory after the outage, not claimed and published again.
    assert publisher.batches == [[1]]


async def test_the_next_batch_goes_out_while_the_last_one_is_marked() -> None:
    store = FakeStore(make_rows(1, 2, 3))
    store.mark_gate.clear()
    publisher = FakePublisher(lambda row: None)
    relay = OutboxRelay(settings(relay_batch_size=1), store=store, publisher=publisher)  # type: ignore[arg-type]

    async with running(relay):
        try:
            await until(lambda: publisher.batches == [[1], [2]], within=2)
            # Batch 2 was claimed and published while batch 1's mark hung,
            # and no third batch goes out before that mark commits.
            await asyncio.sleep(0.1)
            assert (publisher.batches, store.published) == ([[1], [2]], [])
        finally:
            store.mark_gate.set()
        await until(lambda: store.published == [1, 2, 3])


async def test_rows_notified_during_a_pass_go_out_before_its_mark_commits() -> None:
    store = FakeStore(make_rows(1))
    store.mark_gate.clear()
    publisher = FakePublisher(lambda row: None)
    publisher.gate.clear()
    relay = OutboxRelay(
        settings(relay_batch_size=10, relay_poll_interval=60),
        store=store,  # type: ignore[arg-type]
        publisher=publisher,  # type: ignore[arg-type]
    )

    async with running(relay):
        try:
            await until(lambda: publisher.batches == [[1]])
            # Row 2 commits while batch 1 is in flight, and its NOTIFY comes.
            store.pending.update({row.id: row for row in make_rows(2)})
            relay._wakeup.set()
            publisher.gate.set()

            # Batch 1 was not full, yet the relay neither idles nor waits
            # for its mark: row 2 goes out at once.
            await until(lambda: publisher.batches == [[1], [2]], within=2)
            assert store.published == []
        finally:
            store.mark_gate.set()
        await until(lambda: store.published == [1, 2])


async def test_a_mark_the_database_interrupted_is_repeated_first() -> None:
    store = FakeStore(make_rows(1, 2))
    store.fail_next["mark_published"] = 1
    publisher = FakePublisher(lambda row: None)
    relay = OutboxRelay(settings(relay_batch_size=1), store=store, publisher=publisher)  # type: ignore[arg-type]

    async with running(relay):
        await until(lambda: len(store.published) == 2)

    assert store.published == [1, 2]
    assert publisher.batches == [[1], [2]]


async def test_stop_lets_the_batch_in_flight_finish() -> None:
    store = FakeStore(make_rows(1, 2))
    publisher = FakePublisher(lambda row: None)
    publisher.gate.clear()
    relay = OutboxRelay(settings(), store=store, publisher=publisher)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop), name="unit relay")

    await until(lambda: bool(publisher.batches))
    stop.set()
    publisher.gate.set()
    await asyncio.wait_for(task, timeout=5)

    assert store.published == [1, 2]
    assert publisher.closed


class ChannelClosingPublisher(FakePublisher):
    """Like a broker that closes the channel over row ``poison``: every row
    published together with it fails the same way."""

    def __init__(self, poison: int) -> None:
        super().__init__(lambda row: None)
        self.poison = poison

    async def publish_batch(self, rows: Sequence[OutboxRow]) -> BatchOutcome:
        if all(row.id != self.poison for row in rows):
            return await super().publish_batch(rows)
        self.batches.append([row.id for row in rows])
        outcome = BatchOutcome()
        for row in rows:
            outcome.suspect[row.id] = ChannelClosedByBrokerError(
                "the broker closed the channel: PRECONDITION_FAILED"
            )
        return outcome


async def test_a_row_that_closes_the_channel_is_found_alone_and_blamed_alone() -> None:
    store = FakeStore(make_rows(1, 2, 3, 4, 5))
    publisher = ChannelClosingPublisher(poison=3)
    relay = OutboxRelay(settings(), store=store, publisher=publisher)  # type: ignore[arg-type]

    with capture_logs() as logs:
        async with running(relay):
            await until(lambda: len(store.published) == 4 and len(store.failed) == 1)

    assert sorted(store.published) == [1, 2, 4, 5]
    [failure] = store.failed
    assert failure.id == 3
    assert "closed the channel" in failure.error
    # The whole batch first, released uncounted; then each suspect alone.
    assert publisher.batches == [[1, 2, 3, 4, 5], [1], [2], [3], [4], [5]]
    assert store.released == [1, 2, 3, 4, 5]
    assert len([e for e in logs if e["event"] == "outbox_channel_closed"]) == 1
    assert dependency_events(logs, "broker") == []
