"""Waiting out a database outage: retries, their log lines, and shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika
import pytest
from structlog.testing import capture_logs

from consumer import outage
from consumer.dead_letter_queue import describe
from consumer.dead_letters import DEAD_LETTERED_AT_HEADER, REASON_HEADER
from consumer.errors import DatabaseUnavailableError
from consumer.outage import DatabaseOutage, retry_delay


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outage, "RETRY_BASE_SECONDS", 0.001)
    monkeypatch.setattr(outage, "RETRY_MAX_SECONDS", 0.01)


def failing(times: int) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    calls: list[int] = []

    async def step() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise DatabaseUnavailableError("connection refused")
        return "done"

    return calls, step


async def test_a_step_is_retried_until_the_database_answers() -> None:
    tracker = DatabaseOutage(asyncio.Event())
    calls, step = failing(5)

    with capture_logs() as logs:
        assert await tracker.retry(step) == "done"

    assert len(calls) == 6
    assert [e["event"] for e in logs] == [
        "consumer_database_down",
        "consumer_database_up",
    ]
    assert [e["log_level"] for e in logs] == ["warning", "info"]
    assert not tracker.is_down


async def test_concurrent_deliveries_report_one_outage() -> None:
    tracker = DatabaseOutage(asyncio.Event())
    steps = [failing(3)[1] for _ in range(10)]

    with capture_logs() as logs:
        await asyncio.gather(*(tracker.retry(step) for step in steps))

    assert [e["event"] for e in logs] == [
        "consumer_database_down",
        "consumer_database_up",
    ]


async def test_shutdown_ends_the_wait_with_the_last_error() -> None:
    stopping = asyncio.Event()
    tracker = DatabaseOutage(stopping)
    _, step = failing(10**6)

    retrying = asyncio.create_task(tracker.retry(step))
    await asyncio.sleep(0.05)
    assert not retrying.done()
    stopping.set()

    with pytest.raises(DatabaseUnavailableError):
        await asyncio.wait_for(retrying, timeout=1)
    assert tracker.is_down


def test_retry_delay_grows_to_the_cap_with_jitter() -> None:
    assert 0.0005 <= retry_delay(0) <= 0.001
    assert 0.005 <= retry_delay(50) <= 0.01


def incoming(headers: dict[str, object]) -> aio_pika.IncomingMessage:
    class Stub:
        pass

    message = Stub()
    message.headers = headers  # type: ignore[attr-defined]
    message.message_id = "m-1"  # type: ignore[attr-defined]
    message.routing_key = "task.created"  # type: ignore[attr-defined]
    message.correlation_id = "t-1"  # type: ignore[attr-defined]
    message.body = b"{}"  # type: ignore[attr-defined]
    return message  # type: ignore[return-value]


def test_a_dead_letter_names_who_dead_lettered_it_and_why() -> None:
    when = datetime(2026, 1, 2, tzinfo=UTC)
    by_consumer = describe(
        incoming({REASON_HEADER: b"task not found", DEAD_LETTERED_AT_HEADER: when})
    )
    by_broker = describe(
        incoming({"x-death": [{"reason": "delivery_limit", "time": when}]})
    )

    assert (by_consumer.dead_lettered_by, by_consumer.reason) == (
        "consumer",
        "task not found",
    )
    assert (by_broker.dead_lettered_by, by_broker.reason) == (
        "broker",
        "delivery_limit",
    )
    assert by_consumer.dead_lettered_at == by_broker.dead_lettered_at == when
