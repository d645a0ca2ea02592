"""HTTP routes of the task API (v1) and the health probes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import Response as LitestarResponse
from sqlalchemy import text

from service import tasks
from service.middleware import outbox_headers
from service.models import TaskPriority, TaskStatus
from service.problems import problem_response, problem_responses
from service.schemas import (
    Health,
    TaskCreate,
    TaskPage,
    TaskRead,
    TaskStatusRead,
    TaskTypeRead,
)
from service.settings import ServiceSettings

MAX_PAGE_SIZE = 200


class TaskController(Controller):
    path = "/api/v1/tasks"
    tags = ["tasks"]

    @post(
        "/",
        status_code=201,
        summary="Submit a task",
        description=(
            "Stores the task and the message that will run it in one "
            "transaction. Once this answers 201 the task will run, whatever "
            "fails afterwards. The payload is checked against the schema of "
            "its type (see GET /api/v1/task-types)."
        ),
        responses=problem_responses(400, 413, 422, 503),
    )
    async def create(
        self,
        data: JSONBody[TaskCreate],
        request: Request[Any, Any, State],
        state: State,
    ) -> Response[TaskRead]:
        settings: ServiceSettings = state.settings
        # Everything that can reject the request happens before a database
        # connection is taken, so bad input costs nothing and changes nothing.
        task_type, payload = tasks.validate_submission(
            data, state.registry, settings.default_task_type
        )
        async with state.engine.connect() as conn:
            task = await tasks.create_task(
                conn,
                data,
                task_type=task_type,
                payload=payload,
                max_attempts=data.max_attempts or settings.default_max_attempts,
                headers=outbox_headers(request),
            )
        return LitestarResponse(
            task,
            status_code=201,
            headers={"Location": f"/api/v1/tasks/{task.id}"},
        )

    @get(
        "/",
        summary="List tasks, newest first",
        responses=problem_responses(400, 503),
    )
    async def list(
        self,
        state: State,
        status: FromQuery[TaskStatus | None] = None,
        priority: FromQuery[TaskPriority | None] = None,
        task_type: Annotated[
            str | None, QueryParameter(name="type", max_length=200)
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
        filters = tasks.TaskFilters(
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
        responses=problem_responses(404, 503),
    )
    async def get_one(self, task_id: FromPath[uuid.UUID], state: State) -> TaskRead:
        async with state.engine.connect() as conn:
            return await tasks.get_task(conn, task_id)

    @get(
        "/{task_id:uuid}/status",
        summary="A task's status only",
        responses=problem_responses(404, 503),
    )
    async def get_status(
        self, task_id: FromPath[uuid.UUID], state: State
    ) -> TaskStatusRead:
        async with state.engine.connect() as conn:
            task = await tasks.get_task(conn, task_id)
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
        responses=problem_responses(404, 409, 503),
    )
    async def cancel(
        self,
        task_id: FromPath[uuid.UUID],
        request: Request[Any, Any, State],
        state: State,
    ) -> TaskRead:
        async with state.engine.connect() as conn:
            return await tasks.cancel_task(conn, task_id, outbox_headers(request))


@get(
    "/api/v1/task-types",
    tags=["tasks"],
    summary="Registered task types and their payload schemas",
    responses=problem_responses(),
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
