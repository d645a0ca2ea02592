"""Task types that exist only for tests.

Load them with ``TASK_HANDLER_MODULES=tests.handlers``. They register into
``service.registry.default_registry``, skipping a name that is already there,
so importing this module again (under another name, or after a reload) is
harmless.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from service.registry import (
    Handler,
    NonRetryableTaskError,
    Recorder,
    TaskContext,
    default_registry,
    task_type,
)

#: The table the ``ledger`` recorder writes; each test creates it itself.
LEDGER_TABLE_DDL = """
    CREATE TABLE test_ledger (
        task_id uuid NOT NULL,
        amount integer NOT NULL,
        attempt integer NOT NULL
    )
"""


def _register(
    name: str,
    payload_type: type[Any],
    *,
    recorder: Recorder | None = None,
    timeout: float | None = None,
) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        if name in default_registry:
            return handler
        return task_type(name, payload_type, recorder=recorder, timeout=timeout)(
            handler
        )

    return register


class FailTimesPayload(msgspec.Struct, forbid_unknown_fields=True):
    #: Attempts up to and including this number raise.
    fail_first: int
    value: str = ""


@_register("fail_times", FailTimesPayload)
async def fail_times(payload: FailTimesPayload, context: TaskContext) -> object:
    """Fails the first `fail_first` attempts, then echoes `value` and the attempt."""
    if context.attempt <= payload.fail_first:
        raise RuntimeError(f"planned failure on attempt {context.attempt}")
    return {"value": payload.value, "attempt": context.attempt}


class EmptyPayload(msgspec.Struct, forbid_unknown_fields=True):
    pass


@_register("always_fail", EmptyPayload)
async def always_fail(payload: EmptyPayload, context: TaskContext) -> object:
    """Raises a retryable error on every attempt."""
    raise RuntimeError("this task always fails")


@_register("non_retryable", EmptyPayload)
async def non_retryable(payload: EmptyPayload, context: TaskContext) -> object:
    """Raises an error that no retry can fix."""
    raise NonRetryableTaskError("this task can never succeed")


class LedgerPayload(msgspec.Struct, forbid_unknown_fields=True):
    amount: int
    #: Seconds the handler works, so that two deliveries can overlap.
    delay: float = 0.0


async def _record_ledger(
    conn: AsyncConnection, context: TaskContext, result: Any
) -> None:
    await conn.execute(
        text(
            "INSERT INTO test_ledger (task_id, amount, attempt)"
            " VALUES (:task_id, :amount, :attempt)"
        ),
        {
            "task_id": context.task_id,
            "amount": result["amount"],
            "attempt": context.attempt,
        },
    )


@_register("ledger", LedgerPayload, recorder=_record_ledger)
async def ledger(payload: LedgerPayload, context: TaskContext) -> object:
    """Returns `amount`; its recorder books it in `test_ledger`, exactly once."""
    await asyncio.sleep(payload.delay)
    return {"amount": payload.amount}


#: Time limit of the ``crash`` type: short, so that the stuck-task sweeper
#: reaches a crashed task within seconds in tests.
CRASH_TIMEOUT_SECONDS = 1.0


@_register("crash", EmptyPayload, timeout=CRASH_TIMEOUT_SECONDS)
async def crash(payload: EmptyPayload, context: TaskContext) -> object:
    """Ends the consumer process at once, on every attempt: a crash loop."""
    os._exit(1)


class FlakyLedgerPayload(msgspec.Struct, forbid_unknown_fields=True):
    amount: int
    #: Attempt numbers that raise instead of succeeding.
    fail_attempts: list[int] = msgspec.field(default_factory=list)
    #: Seconds each attempt works before it succeeds or fails.
    delay: float = 0.0


@_register("flaky_ledger", FlakyLedgerPayload, recorder=_record_ledger)
async def flaky_ledger(payload: FlakyLedgerPayload, context: TaskContext) -> object:
    """Fails the attempts in `fail_attempts`; a success books `amount` once."""
    await asyncio.sleep(payload.delay)
    if context.attempt in payload.fail_attempts:
        raise RuntimeError(f"planned failure on attempt {context.attempt}")
    return {"amount": payload.amount}
