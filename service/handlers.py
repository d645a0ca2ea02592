"""The built-in task types."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated

import msgspec

from service.registry import TaskContext, task_type


class ChecksumPayload(msgspec.Struct, forbid_unknown_fields=True):
    #: Text to hash.
    text: Annotated[str, msgspec.Meta(max_length=100_000)] = ""
    #: How many times SHA-256 is applied, each round to the previous hex digest.
    rounds: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1


def checksum_of(text: str, rounds: int = 1) -> dict[str, object]:
    """The result the ``checksum`` type must produce, for clients and tests."""
    digest = text
    for _ in range(rounds):
        digest = hashlib.sha256(digest.encode()).hexdigest()
    return {"sha256": digest, "length": len(text), "rounds": rounds}


@task_type("checksum", ChecksumPayload)
async def checksum(payload: ChecksumPayload, context: TaskContext) -> object:
    """Default type: SHA-256 of `text`, repeated `rounds` times, and its length."""
    return checksum_of(payload.text, payload.rounds)


class SleepPayload(msgspec.Struct, forbid_unknown_fields=True):
    #: Seconds to work for.
    seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)]


@task_type("sleep", SleepPayload)
async def sleep(payload: SleepPayload, context: TaskContext) -> object:
    """Waits `seconds`; stops at once when the task is cancelled."""
    # The consumer also cancels this coroutine on cancellation; waiting on the
    # event as well makes the handler stop even where that cancel is delayed.
    try:
        await asyncio.wait_for(context.cancelled.wait(), timeout=payload.seconds)
    except TimeoutError:
        return {"slept_seconds": payload.seconds}
    raise asyncio.CancelledError("task cancelled")
