"""HTTP routes of the task API (v1) and the health probes.

The v1 routes are mounted under ``/api/v1`` by ``service.app``, behind the
access middleware of ``service.auth``; each names the scope it needs in
``opt["scope"]``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, MediaType, Request, Response, delete, get, post
from litestar.datastructures import ResponseHeader, State
from litestar.openapi import ResponseSpec
from litestar.params import (
    FromPath,
    FromQuery,
    HeaderParameter,
    JSONBody,
    QueryParameter,
)
from litestar.response import Response as LitestarResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import text

from service import tasks
from service.api_keys import Principal, Scope
from service.database import pooled
from service.idempotency import IdempotencyClaim, request_hash
from service.middleware import outbox_headers
from service.models import TaskPriority, TaskStatus
from service.problems import problem_response, problem_responses
from service.schemas import (
    NO_NUL_PATTERN,
    Health,
    TaskCreate,
    TaskPage,
    TaskRead,
    TaskStatusRead,
    TaskTypeRead,
)
from service.settings import ServiceSettings

MAX_PAGE_SIZE = 200

#: Printable ASCII without spaces, as for any token sent in a header.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"

AuthenticatedRequest = Request[Principal, str, State]


def api_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """Problem responses of a v1 route: its own plus what every v1 route may say.

    Any v1 route can refuse the key (401), its scope (403) or the rate
    (429), and needs the database to check the key (503).
    """
    return problem_responses(*sorted({*statuses, 401, 403, 429, 503}))


def visible_owner(principal: Principal) -> str | None:
    """Whose tasks the principal may see: its own, or everyone's for admin."""
    return None if principal.is_admin else principal.name


class TaskController(Controller):
    path = "/tasks"
    tags = ["tasks"]

    @post(
        "/",
        status_code=201,
        summary="Submit a task",
        description=(
            "Stores the task and the message that will run it in one "
            "transaction. Once this answers 201 the task will run, whatever "
            "fails afterwards. The payload is checked against the schema of "
            "its type (see GET /api/v1/task-types). With an `Idempotency-Key`, "
            "repeating the request with the same body answers 201 with the "
            "task the first request created (as it is now) and creates "
            "nothing; the same key with another body is a 422."
        ),
        response_headers=[
            ResponseHeader(
                name="Location",
                description="Path of the task.",
                documentation_only=True,
            ),
            ResponseHeader(
                name="Idempotent-Replayed",
                description="`true` when an earlier request made this task.",
                required=False,
                documentation_only=True,
            ),
        ],
        responses=api_responses(400, 413, 422),
        opt={"scope": Scope.TASKS_WRITE},
    )
    async def create(
        self,
        data: JSONBody[TaskCreate],
        request: AuthenticatedRequest,
        state: State,
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(
                name="Idempotency-Key",
                description=(
                    "Any unique string, e.g. a UUID. Repeating a request with "
                    "the same key and body returns the first one's task."
                ),
                pattern=IDEMPOTENCY_KEY_PATTERN,
            ),
        ] = None,
    ) -> Response[TaskRead]:
        settings: ServiceSettings = state.settings
        # Everything that can reject the request happens before a database
        # connection is taken, so bad input costs nothing and changes nothing.
        task_type, payload = tasks.validate_submission(
            data,
            state.registry,
            settings.default_task_type,
            max_payload_bytes=settings.api_max_payload_bytes,
            max_payload_depth=settings.api_max_payload_depth,
        )
        claim = None
        if idempotency_key is not None:
            claim = IdempotencyClaim(
                owner=request.user.name,
                key=idempotency_key,
                request_hash=request_hash(data),
                ttl_seconds=settings.api_idempotency_ttl_seconds,
            )
        async with pooled(state.driver_pool) as conn:
            submitted = await tasks.submit_task(
                conn,
                data,
                owner=request.user.name,
                task_type=task_type,
                payload=payload,
                max_attempts=data.max_attempts or settings.default_max_attempts,
                headers=outbox_headers(request),
                idempotency_claim=claim,
            )
        headers = {}
        task = submitted.task
        if task is None:
            assert submitted.earlier is not None
            # Committed by the earlier request; read as it is now.
            async with state.engine.connect() as reading:
                task = await tasks.get_task(
                    reading, submitted.earlier, owner=request.user.name
                )
            headers["Idempotent-Replayed"] = "true"
        headers["Location"] = f"/api/v1/tasks/{task.id}"
        return LitestarResponse(task, status_code=201, headers=headers)

    @get(
        "/",
        summary="List tasks, newest first",
        description="The caller's own tasks; an `admin` key lists everyone's.",
        responses=api_responses(400),
        opt={"scope": Scope.TASKS_READ},
    )
    async def list(
        self,
        request: AuthenticatedRequest,
        state: State,
        status: FromQuery[TaskStatus | None] = None,
        priority: FromQuery[TaskPriority | None] = None,
        task_type: Annotated[
            str | None,
            QueryParameter(name="type", max_length=200, pattern=NO_NUL_PATTERN),
        ] = None,
        created_after: Annotated[
            datetime | None, QueryParameter(description="Inclusive lower bound.")
        ] = None,
        created_before: Annotated[
            datetime | None, QueryParameter(description="Exclusive upper bound.")
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE_SIZE)] = 50,
        cursor: Annotated[
            str | None,
            QueryParameter(
                description="`next_cursor` of the previous page.", max_length=200
            ),
        ] = None,
    ) -> TaskPage:
        tasks.require_storable_time(created_after, "created_after")
        tasks.require_storable_time(created_before, "created_before")
        filters = tasks.TaskFilters(
            owner=visible_owner(request.user),
            status=status,
            priority=priority,
            type=task_type,
            created_after=created_after,
            created_before=created_before,
        )
        after = tasks.decode_cursor(cursor) if cursor is not None else None
        async with state.engine.connect() as conn:
            items, next_cursor = await tasks.list_tasks(conn, filters, limit, after)
        return TaskPage(items=items, next_cursor=next_cursor)

    @get(
        "/{task_id:uuid}",
        summary="One task",
        responses=api_responses(404),
        opt={"scope": Scope.TASKS_READ},
    )
    async def get_one(
        self, task_id: FromPath[uuid.UUID], request: AuthenticatedRequest, state: State
    ) -> TaskRead:
        async with state.engine.connect() as conn:
            return await tasks.get_task(
                conn, task_id, owner=visible_owner(request.user)
            )

    @get(
        "/{task_id:uuid}/status",
        summary="A task's status only",
        responses=api_responses(404),
        opt={"scope": Scope.TASKS_READ},
    )
    async def get_status(
        self, task_id: FromPath[uuid.UUID], request: AuthenticatedRequest, state: State
    ) -> TaskStatusRead:
        async with state.engine.connect() as conn:
            task = await tasks.get_task(
                conn, task_id, owner=visible_owner(request.user)
            )
        return TaskStatusRead(
            id=task.id, status=task.status, updated_at=task.updated_at
        )

    @delete(
        "/{task_id:uuid}",
        status_code=200,
        summary="Cancel a task",
        description=(
            "The task row is kept with status CANCELLED. A running task is "
            "stopped; a queued one is never started. 409 once it finished."
        ),
        responses=api_responses(404, 409),
        opt={"scope": Scope.TASKS_WRITE},
    )
    async def cancel(
        self, task_id: FromPath[uuid.UUID], request: AuthenticatedRequest, state: State
    ) -> TaskRead:
        async with state.engine.connect() as conn:
            return await tasks.cancel_task(
                conn,
                task_id,
                outbox_headers(request),
                owner=visible_owner(request.user),
            )

    @post(
        "/{task_id:uuid}/retry",
        status_code=200,
        summary="Run a FAILED task again",
        description=(
            "Sets the task back to PENDING with its attempts at 0 and queues "
            "it, in one transaction. 409 unless the task is FAILED."
        ),
        responses=api_responses(404, 409),
        opt={"scope": Scope.TASKS_WRITE},
    )
    async def retry(
        self, task_id: FromPath[uuid.UUID], request: AuthenticatedRequest, state: State
    ) -> TaskRead:
        async with state.engine.connect() as conn:
            return await tasks.retry_task(
                conn,
                task_id,
                outbox_headers(request),
                owner=visible_owner(request.user),
            )


@get(
    "/task-types",
    tags=["tasks"],
    summary="Registered task types and their payload schemas",
    responses=api_responses(),
    opt={"scope": Scope.TASKS_READ},
)
async def list_task_types(state: State) -> list[TaskTypeRead]:
    return [
        TaskTypeRead(
            name=t.name, description=t.description, payload_schema=t.json_schema()
        )
        for t in state.registry
    ]


@get(
    "/health/live",
    tags=["health"],
    summary="The process is up",
    opt={"skip_access_log": True},
)
async def live() -> Health:
    return Health(status="ok")


@get(
    "/health/ready",
    tags=["health"],
    summary="The database answers",
    responses=problem_responses(503),
    opt={"skip_access_log": True},
)
async def ready(state: State) -> Response[Any]:
    try:
        async with state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception:
        return problem_response(
            503, "database-unavailable", "The database does not answer."
        )
    return LitestarResponse(Health(status="ok"))


@get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics, in the text exposition format",
    media_type=MediaType.TEXT,
)
async def metrics() -> Response[bytes]:
    # As a header: a text/* media type would get a second charset appended,
    # which Prometheus refuses.
    return LitestarResponse(
        generate_latest(REGISTRY), headers={"content-type": CONTENT_TYPE_LATEST}
    )
