"""Request and response bodies of the HTTP API, as msgspec structs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

from service.models import TaskPriority, TaskStatus

Title = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Description = Annotated[str, msgspec.Meta(max_length=10_000)]
MaxAttempts = Annotated[int, msgspec.Meta(ge=1, le=100)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class TaskCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A task to run. `payload` is checked against the schema of `type`."""

    title: Title
    description: Description | None = None
    priority: TaskPriority = TaskPriority.MEDIUM
    #: A registered task type; the service's default type when omitted.
    type: str | None = None
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Attempts before the task is FAILED; the service default when omitted.
    max_attempts: MaxAttempts | None = None
    #: Do not start before this time (with a timezone offset).
    run_at: AwareDatetime | None = None


class TaskRead(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    title: str
    description: str | None
    type: str
    payload: dict[str, Any]
    priority: TaskPriority
    status: TaskStatus
    attempts: int
    max_attempts: int
    result: Any | None
    error: str | None
    run_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class TaskStatusRead(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    status: TaskStatus
    updated_at: datetime


class TaskPage(msgspec.Struct, kw_only=True):
    items: list[TaskRead]
    #: Pass as `cursor` to get the next page; null on the last page.
    next_cursor: str | None


class TaskTypeRead(msgspec.Struct, kw_only=True):
    name: str
    description: str
    #: JSON Schema of the payload this type accepts.
    payload_schema: dict[str, Any]


class FieldError(msgspec.Struct, kw_only=True):
    #: Where the problem is, e.g. `title` or `payload.seconds`.
    field: str
    message: str


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An RFC 9457 problem document (`application/problem+json`)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    #: Per-field messages of a validation failure.
    errors: list[FieldError] | None = None


class Health(msgspec.Struct, kw_only=True):
    status: str
