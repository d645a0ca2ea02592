"""``Idempotency-Key``: a retried submission returns the task the first one made.

A key belongs to the principal that sent it and names one request body (by
its hash) and the task that body created. Sending the same key with the same
body again returns that task and writes nothing; with another body it is
refused. After the time to live a key is free to name a new request.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from service import queries
from service.errors import IdempotencyKeyReusedError
from service.schemas import TaskCreate


@dataclass(frozen=True, kw_only=True)
class IdempotencyClaim:
    """What a submission with an ``Idempotency-Key`` asks to record."""

    owner: str
    key: str
    request_hash: str
    ttl_seconds: int


def request_hash(data: TaskCreate) -> str:
    """SHA-256 of the body as parsed, so key order and spacing do not matter."""
    canonical = msgspec.json.encode(msgspec.to_builtins(data), order="sorted")
    return hashlib.sha256(canonical).hexdigest()


async def claim(
    conn: asyncpg.Connection[Any], claim: IdempotencyClaim, task_id: uuid.UUID
) -> uuid.UUID | None:
    """Record that ``task_id`` answers this key, or return the task that already does.

    Must run inside the transaction that inserts the task, before the insert.
    None means the key is ours and the caller goes on to create the task. A
    concurrent submission with the same key waits here until ours commits or
    rolls back, then finds our row (or takes the key after all), so however
    many race, one task is created. An expired row is taken over as if it
    did not exist.

    Raises IdempotencyKeyReusedError when the key answers a different body.
    """
    while True:
        taken = await conn.fetchval(
            queries.CLAIM_IDEMPOTENCY_KEY,
            claim.owner,
            claim.key,
            claim.request_hash,
            task_id,
            claim.ttl_seconds,
        )
        if taken is not None:
            return None

        # The conflicting row is committed and live: its request and task
        # decide.
        existing = await conn.fetchrow(
            queries.IDEMPOTENCY_KEY_HOLDER, claim.owner, claim.key
        )
        if existing is None:
            # Deleted by hand between the two statements: the key is free.
            continue
        if existing["request_hash"] != claim.request_hash:
            raise IdempotencyKeyReusedError(
                "this Idempotency-Key was used with a different request body"
            )
        return uuid.UUID(str(existing["task_id"]))
