"""Task operations behind the API: each one is a single database transaction.

Every write here either commits the task change together with the outbox row
that announces it, or changes nothing. If the process dies after the commit
but before answering, the change stands and the relay still publishes it; the
client learns the outcome by reading the task.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from sqlalchemy import (
    ColumnElement,
    Select,
    func,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox_relay.outbox import OutboxMessage, enqueue
from service import idempotency, queries
from service.database import json_text
from service.errors import (
    InvalidCursorError,
    InvalidParameterError,
    RequestValidationError,
    TaskNotFoundError,
    TaskStateConflictError,
)
from service.idempotency import IdempotencyClaim
from service.models import TERMINAL_STATUSES, Task, TaskPriority, TaskStatus
from service.problems import field_error_from_msgspec
from service.registry import HandlerRegistry
from service.schemas import TaskCreate, TaskRead

_TASK_COLUMNS = [getattr(Task, name) for name in TaskRead.__struct_fields__]

DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_MAX_PAYLOAD_DEPTH = 32


class TaskFilters(msgspec.Struct, kw_only=True):
    #: Only this principal's tasks; None lists every principal's (admin).
    owner: str | None
    status: TaskStatus | None = None
    priority: TaskPriority | None = None
    type: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def _read(row: Any) -> TaskRead:
    return msgspec.convert(dict(row._mapping), TaskRead, from_attributes=True)


def _announcement(
    routing_key: str,
    *,
    task_id: uuid.UUID,
    task_type: str,
    status: TaskStatus,
    headers: Mapping[str, str],
    available_at: datetime | None = None,
) -> OutboxMessage:
    """The outbox message of a task event: the body every consumer reads."""
    return OutboxMessage(
        routing_key=routing_key,
        body={"task_id": str(task_id), "type": task_type, "status": status.value},
        correlation_id=str(task_id),
        headers=headers,
        available_at=available_at,
    )


def _event(
    routing_key: str, task: TaskRead, headers: Mapping[str, str]
) -> OutboxMessage:
    return _announcement(
        routing_key,
        task_id=task.id,
        task_type=task.type,
        status=task.status,
        headers=headers,
    )


def _visible_to(owner: str | None) -> ColumnElement[bool]:
    """Where-clause for the tasks a caller may see: its own, or all (admin)."""
    return Task.owner == owner if owner is not None else true()


def require_storable_time(value: datetime | None, field: str) -> None:
    """Raise InvalidParameterError unless the database driver can send ``value``.

    A time near the ends of the calendar with an offset leaves Python's
    range when it is converted to UTC on its way to PostgreSQL.
    """
    if value is None:
        return
    try:
        value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidParameterError(field, "time out of range") from None


#: A value met while walking a payload: the value, its depth, the entry of
#: the object or array holding it (None for the payload) and its key or index.
_Walked = tuple[Any, int, "_Walked | None", str | int]


def _path_of(entry: _Walked) -> str:
    """``payload.items[2].name`` for the value of ``entry``."""
    steps: list[str] = []
    while entry[2] is not None:
        step = entry[3]
        steps.append(f"[{step}]" if isinstance(step, int) else f".{step}")
        entry = entry[2]
    return "payload" + "".join(reversed(steps))


def check_payload(payload: Any, *, max_bytes: int, max_depth: int) -> None:
    """Refuse payloads too big, too deep, or holding text PostgreSQL cannot store.

    Walks the payload without recursion, and measures its size only once its
    depth is known to be sane, so no payload can exhaust the interpreter's
    stack here. Raises RequestValidationError.
    """
    # Each entry keeps its parent's entry and its own key or index, so a
    # value's path is spelled out only for an error.
    pending: list[_Walked] = [(payload, 1, None, "")]
    keys: Iterable[str]
    while pending:
        entry = pending.pop()
        value, depth = entry[0], entry[1]
        if isinstance(value, dict):
            children: Iterable[tuple[str | int, Any]] = value.items()
            keys = value.keys()
        elif isinstance(value, list):
            children = enumerate(value)
            keys = ()
        else:
            if isinstance(value, str) and "\x00" in value:
                raise RequestValidationError(
                    [(_path_of(entry), "contains a NUL character")]
                )
            continue
        if depth > max_depth:
            raise RequestValidationError(
                [("payload", f"nested deeper than {max_depth} levels")]
            )
        if any("\x00" in key for key in keys):
            raise RequestValidationError(
                [(_path_of(entry), "a key contains a NUL character")]
            )
        pending.extend((child, depth + 1, entry, step) for step, child in children)

    if len(msgspec.json.encode(payload)) > max_bytes:
        raise RequestValidationError(
            [("payload", f"larger than {max_bytes} bytes as JSON")]
        )


def validate_submission(
    data: TaskCreate,
    registry: HandlerRegistry,
    default_type: str,
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_payload_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH,
) -> tuple[str, dict[str, Any]]:
    """The task type to use and the payload normalised by its schema.

    Raises UnknownTaskTypeError or RequestValidationError; nothing is written.
    """
    check_payload(
        data.payload, max_bytes=max_payload_bytes, max_depth=max_payload_depth
    )
    try:
        require_storable_time(data.run_at, "run_at")
    except InvalidParameterError as exc:
        raise RequestValidationError([(exc.field, exc.message)]) from None
    task_type = registry.get(data.type or default_type)
    try:
        normalised = task_type.decode(data.payload)
    except msgspec.ValidationError as exc:
        error = field_error_from_msgspec("payload", exc)
        raise RequestValidationError([(error.field, error.message)]) from exc
    return task_type.name, msgspec.to_builtins(normalised)


class Submitted(msgspec.Struct, frozen=True):
    """What :func:`submit_task` did: created ``task``, or found that an
    earlier request with the same idempotency key created ``earlier``."""

    task: TaskRead | None = None
    earlier: uuid.UUID | None = None


async def submit_task(
    conn: asyncpg.Connection[Any],
    data: TaskCreate,
    *,
    owner: str,
    task_type: str,
    payload: dict[str, Any],
    max_attempts: int,
    headers: Mapping[str, str],
    idempotency_claim: IdempotencyClaim | None = None,
) -> Submitted:
    """Insert the task as NEW and its ``task.created`` outbox row, atomically.

    Without an idempotency claim this is one statement, so one round trip
    and one commit. With one, the key is claimed first in the same
    transaction; if an earlier request holds it, nothing is inserted and the
    earlier request's task id is returned instead. If the process dies
    before the commit, nothing was written; after it, the task stands and
    the relay publishes it, whether or not the client heard the answer.
    """
    task_id = uuid.uuid4()
    announcement = _announcement(
        "task.created",
        task_id=task_id,
        task_type=task_type,
        status=TaskStatus.NEW,
        headers=headers,
        available_at=data.run_at,
    )
    arguments = (
        task_id,
        owner,
        data.title,
        data.description,
        task_type,
        json_text(payload),
        data.priority.value,
        max_attempts,
        data.run_at,
        json_text(headers),
        announcement.routing_key,
        json_text(announcement.body),
        json_text(announcement.headers),
        announcement.correlation_id,
        announcement.available_at,
    )
    if idempotency_claim is None:
        row = await conn.fetchrow(queries.SUBMIT_TASK, *arguments)
    else:
        async with conn.transaction():
            earlier = await idempotency.claim(conn, idempotency_claim, task_id)
            if earlier is not None:
                return Submitted(earlier=earlier)
            row = await conn.fetchrow(queries.SUBMIT_TASK, *arguments)
    assert row is not None  # the INSERT ... RETURNING gives its one row

    task = TaskRead(
        id=task_id,
        title=data.title,
        description=data.description,
        type=task_type,
        payload=payload,
        priority=data.priority,
        status=TaskStatus.NEW,
        attempts=0,
        max_attempts=max_attempts,
        result=None,
        error=None,
        run_at=data.run_at,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=None,
        completed_at=None,
    )
    return Submitted(task=task)


async def get_task(
    conn: AsyncConnection, task_id: uuid.UUID, *, owner: str | None
) -> TaskRead:
    """The task, if ``owner`` may see it (None: anyone's); else TaskNotFoundError."""
    row = (
        await conn.execute(
            select(*_TASK_COLUMNS).where(Task.id == task_id, _visible_to(owner))
        )
    ).one_or_none()
    if row is None:
        raise TaskNotFoundError(str(task_id))
    return _read(row)


async def _lock_status(
    conn: AsyncConnection, task_id: uuid.UUID, owner: str | None
) -> str:
    """Lock the caller's task row until the transaction ends; its status.

    Raises TaskNotFoundError for an unknown task or one of another owner.
    """
    current = (
        await conn.execute(
            select(Task.status)
            .where(Task.id == task_id, _visible_to(owner))
            .with_for_update()
        )
    ).scalar_one_or_none()
    if current is None:
        raise TaskNotFoundError(str(task_id))
    return str(current)


async def cancel_task(
    conn: AsyncConnection,
    task_id: uuid.UUID,
    headers: Mapping[str, str],
    *,
    owner: str | None,
) -> TaskRead:
    """Mark a task CANCELLED and announce it, unless it already finished.

    A consumer that is running the task notices the status and stops; one
    that receives the task's message later skips it.
    """
    async with conn.begin():
        # Lock first, so a consumer recording an outcome at the same moment
        # either finishes before us (and we answer 409) or sees CANCELLED.
        current = await _lock_status(conn, task_id, owner)
        if current in TERMINAL_STATUSES:
            raise TaskStateConflictError(f"the task is already {current}")

        row = (
            await conn.execute(
                update(Task)
                .where(Task.id == task_id)
                .values(
                    status=TaskStatus.CANCELLED.value,
                    completed_at=func.now(),
                    updated_at=func.now(),
                )
                .returning(*_TASK_COLUMNS)
            )
        ).one()
        task = _read(row)
        await enqueue(conn, _event("task.cancelled", task, headers))
    return task


async def retry_task(
    conn: AsyncConnection,
    task_id: uuid.UUID,
    headers: Mapping[str, str],
    *,
    owner: str | None,
) -> TaskRead:
    """Put a FAILED task back to PENDING with fresh attempts, and announce it.

    The ``task.retry`` row is written in the same transaction, so the task
    is queued exactly when its status says so. The row lock makes two
    retries racing each other end in one retry and one 409.
    """
    async with conn.begin():
        current = await _lock_status(conn, task_id, owner)
        if current != TaskStatus.FAILED:
            raise TaskStateConflictError(
                f"only a FAILED task can be retried; this one is {current}"
            )

        row = (
            await conn.execute(
                update(Task)
                .where(Task.id == task_id)
                .values(
                    status=TaskStatus.PENDING.value,
                    attempts=0,
                    error=None,
                    started_at=None,
                    completed_at=None,
                    updated_at=func.now(),
                    # The retrying request's trace is the task's from now on,
                    # as it is for the task.retry row below.
                    trace_headers=dict(headers),
                )
                .returning(*_TASK_COLUMNS)
            )
        ).one()
        task = _read(row)
        await enqueue(conn, _event("task.retry", task, headers))
    return task


async def list_tasks(
    conn: AsyncConnection,
    filters: TaskFilters,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> tuple[list[TaskRead], str | None]:
    """Newest first, one page; the cursor is the last row's (created_at, id)."""
    query: Select[Any] = select(*_TASK_COLUMNS).where(_visible_to(filters.owner))
    if filters.status is not None:
        query = query.where(Task.status == filters.status.value)
    if filters.priority is not None:
        query = query.where(Task.priority == filters.priority.value)
    if filters.type is not None:
        query = query.where(Task.type == filters.type)
    if filters.created_after is not None:
        query = query.where(Task.created_at >= filters.created_after)
    if filters.created_before is not None:
        query = query.where(Task.created_at < filters.created_before)
    if after is not None:
        query = query.where(tuple_(Task.created_at, Task.id) < tuple_(*after))

    query = query.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit + 1)
    rows = (await conn.execute(query)).all()
    items = [_read(row) for row in rows[:limit]]

    next_cursor = None
    if len(rows) > limit:
        last = items[-1]
        next_cursor = encode_cursor(last.created_at, last.id)
    return items, next_cursor


def encode_cursor(created_at: datetime, task_id: uuid.UUID) -> str:
    raw = msgspec.json.encode([created_at, task_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, task_id = msgspec.json.decode(raw, type=tuple[datetime, uuid.UUID])
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidCursorError(cursor) from exc
    if created_at.tzinfo is None:
        raise InvalidCursorError(cursor)
    try:
        # A forged cursor can hold a time that overflows once moved to UTC.
        created_at = created_at.astimezone(UTC)
    except OverflowError as exc:
        raise InvalidCursorError(cursor) from exc
    return created_at, task_id
