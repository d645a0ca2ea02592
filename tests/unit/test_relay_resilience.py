from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from outbox_relay.resilience import Backoff, DependencyHealth, retry_delay, wait_first


@pytest.mark.parametrize(
    ("attempts", "nominal"), [(0, 1.0), (1, 2.0), (3, 8.0), (10, 300.0)]
)
def test_retry_delay_doubles_up_to_the_cap(attempts: int, nominal: float) -> None:
    def low() -> float:
        return 0.0

    def high() -> float:
        return 1.0

    assert retry_delay(attempts, 1.0, 300.0, jitter=low) == nominal / 2
    assert retry_delay(attempts, 1.0, 300.0, jitter=high) == nominal


def test_retry_delay_survives_absurd_attempt_counts() -> None:
    assert retry_delay(10_000, 1.0, 300.0) <= 300.0


def test_backoff_grows_and_resets() -> None:
    backoff = Backoff(base=1.0, cap=4.0)

    delays = [backoff.next_delay() for _ in range(5)]
    backoff.reset()

    assert 0.5 <= delays[0] <= 1.0
    assert 2.0 <= delays[2] <= 4.0
    assert all(2.0 <= delay <= 4.0 for delay in delays[3:])
    assert backoff.next_delay() <= 1.0


def test_an_outage_is_one_warning_and_one_info() -> None:
    health = DependencyHealth("database")

    with capture_logs() as logs:
        for _ in range(5):
            health.down(ConnectionRefusedError("refused"))
        health.up()
        health.up()

    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("outbox_dependency_down", "warning"),
        ("outbox_dependency_up", "info"),
    ]
    assert logs[0]["dependency"] == "database"
    assert logs[0]["error"] == "refused"
    assert not health.is_down


async def test_wait_first_returns_on_the_first_and_cancels_the_rest() -> None:
    first = asyncio.Event()
    never = asyncio.Event()
    first.set()

    await asyncio.wait_for(wait_first(first.wait(), never.wait(), at_most=60), 1)

    assert not [t for t in asyncio.all_tasks() if "outbox-relay-wait" in t.get_name()]


async def test_wait_first_gives_up_after_at_most() -> None:
    never = asyncio.Event()

    await asyncio.wait_for(wait_first(never.wait(), at_most=0.01), 1)
