"""Pieces of one delivery's processing that need neither database nor broker."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import pytest
import sqlalchemy.exc

from consumer.errors import HandlerTimeoutError, is_transient_database_error
from consumer.processing import MAX_ERROR_LENGTH, error_text, retry_delay, run_handler
from service.registry import NonRetryableTaskError, TaskContext, TaskType


class Payload(msgspec.Struct):
    seconds: float


async def nap(payload: Payload, context: TaskContext) -> object:
    await asyncio.sleep(payload.seconds)
    return {"slept": payload.seconds}


def context() -> TaskContext:
    return TaskContext(
        task_id=uuid.uuid4(),
        task_type="nap",
        attempt=1,
        max_attempts=3,
        cancelled=asyncio.Event(),
    )


@pytest.mark.parametrize("attempt", [1, 2, 3, 8, 10_000])
def test_retry_delay_stays_within_the_exponential_ceiling(attempt: int) -> None:
    ceiling = min(60.0, 0.5 * 2 ** min(attempt - 1, 64))

    delays = [retry_delay(attempt, 0.5, 60.0) for _ in range(200)]

    assert all(0 <= delay <= ceiling for delay in delays)
    # Full jitter spreads the delays instead of repeating one value.
    assert len(set(delays)) > 1


def test_error_text_names_the_class_and_is_truncated() -> None:
    assert error_text(ValueError("bad value")) == "ValueError: bad value"
    assert error_text(TimeoutError()) == "TimeoutError"

    long = error_text(RuntimeError("x" * 10_000))
    assert len(long) == MAX_ERROR_LENGTH
    assert long.startswith("RuntimeError: xxx")


def test_connection_trouble_is_transient_and_bad_sql_is_not() -> None:
    class DriverError(Exception):
        def __init__(self, sqlstate: str) -> None:
            super().__init__(sqlstate)
            self.sqlstate = sqlstate

    def wrapped(sqlstate: str) -> sqlalchemy.exc.DBAPIError:
        return sqlalchemy.exc.DBAPIError("SELECT 1", {}, DriverError(sqlstate))

    assert is_transient_database_error(ConnectionRefusedError())
    assert is_transient_database_error(sqlalchemy.exc.TimeoutError())
    assert is_transient_database_error(wrapped("08006"))
    assert is_transient_database_error(wrapped("40001"))
    assert is_transient_database_error(wrapped("57P01"))
    assert not is_transient_database_error(wrapped("42P01"))
    assert not is_transient_database_error(wrapped("23505"))
    assert not is_transient_database_error(ValueError())


async def test_run_handler_returns_the_handler_result() -> None:
    task_type = TaskType(name="nap", payload_type=Payload, handler=nap)

    assert await run_handler(task_type, {"seconds": 0}, context()) == {"slept": 0}


async def test_run_handler_enforces_the_timeout() -> None:
    task_type = TaskType(name="nap", payload_type=Payload, handler=nap, timeout=0.05)

    with pytest.raises(HandlerTimeoutError):
        await run_handler(task_type, {"seconds": 5}, context())


async def test_a_payload_the_type_no_longer_accepts_is_not_retried() -> None:
    task_type = TaskType(name="nap", payload_type=Payload, handler=nap)

    with pytest.raises(NonRetryableTaskError, match="does not match"):
        await run_handler(task_type, {"minutes": 1}, context())
