"""Request and response bodies of the HTTP API, as msgspec structs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

from service.models import TaskPriority, TaskStatus

#: PostgreSQL cannot store NUL characters in text, so none are accepted.
NO_NUL_PATTERN = "^[^\\x00]*$"

Title = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL_PATTERN)
]
Description = Annotated[str, msgspec.Meta(max_length=10_000, pattern=NO_NUL_PATTERN)]
TypeName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
MaxAttempts = Annotated[int, msgspec.Meta(ge=1, le=100)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class TaskCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A task to run. `payload` is checked against the schema of `type`."""

    title: Title
    description: Description | None = None
    priority: TaskPriority = TaskPriority.MEDIUM
    #: A registered task type; the service's default type when omitted.
    type: TypeName | None = None
    #: At most API_MAX_PAYLOAD_BYTES as JSON, nested at most
    #: API_MAX_PAYLOAD_DEPTH deep, without NUL characters.
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
    #: Any JSON value the handler returned; null until the task COMPLETED.
    result: Any
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
