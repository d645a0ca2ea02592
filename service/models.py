"""Database tables of the task service (the outbox lives in ``outbox_relay``)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outbox_relay.schema import metadata


class TaskStatus(enum.StrEnum):
    NEW = "NEW"
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}
)


#: Owner of task rows written without one: rows from before API keys existed,
#: or inserted by hand. Only an ``admin`` key (or one whose principal is
#: named ``legacy``) sees them.
LEGACY_OWNER = "legacy"


class TaskPriority(enum.StrEnum):
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"


def _in(column: str, values: type[enum.StrEnum]) -> str:
    listed = ", ".join(f"'{member.value}'" for member in values)
    return f"{column} IN ({listed})"


class Base(DeclarativeBase):
    metadata = metadata


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    #: The principal whose API key created the task; only it and admins see it.
    owner: Mapped[str] = mapped_column(Text, server_default=text(f"'{LEGACY_OWNER}'"))
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    priority: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer)
    result: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: ``traceparent`` and ``x-request-id`` of the request that created (or
    #: last retried) the task. The stuck-task sweeper writes them on the rows
    #: it adds, so those stay in the task's trace although no delivery of the
    #: task's messages is at hand.
    trace_headers: Mapped[dict[str, str]] = mapped_column(
        JSONB, server_default=text("'{}'::jsonb")
    )

    __table_args__ = (
        CheckConstraint(_in("status", TaskStatus), name="status"),
        CheckConstraint(_in("priority", TaskPriority), name="priority"),
        CheckConstraint("max_attempts >= 1", name="max_attempts"),
        # Keyset pagination walks (created_at, id); the status variant serves
        # the common "what is still queued" listing.
        Index("ix_tasks_created_at_id", "created_at", "id"),
        Index("ix_tasks_status_created_at_id", "status", "created_at", "id"),
        # A principal's own listing walks the same keyset within its rows.
        Index("ix_tasks_owner_created_at_id", "owner", "created_at", "id"),
    )


class ApiKey(Base):
    """A credential of one principal; only the SHA-256 of the key is stored."""

    __tablename__ = "api_keys"

    #: The public part of the key, by which a presented key is looked up.
    key_id: Mapped[str] = mapped_column(Text, primary_key=True)
    #: The principal the key acts for; tasks are owned by this name.
    name: Mapped[str] = mapped_column(Text)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    key_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(
            "cardinality(scopes) > 0 AND scopes <@ "
            "ARRAY['tasks:read', 'tasks:write', 'admin']::text[]",
            name="scopes",
        ),
        Index("ix_api_keys_name", "name"),
    )


class IdempotencyKey(Base):
    """The task an ``Idempotency-Key`` of one principal created, and for what.

    The primary key (owner, key) is the unique constraint that makes
    concurrent submissions with the same key create one task: the losers'
    inserts wait for the winner's commit and then conflict with its row.
    """

    __tablename__ = "idempotency_keys"

    owner: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    #: SHA-256 of the canonical request body; a different body is refused.
    request_hash: Mapped[str] = mapped_column(Text)
    # Deferred, because the key row is written before the task it names:
    # claiming the key first is what stops a second task being inserted.
    task_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tasks.id", deferrable=True, initially="DEFERRED")
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
