"""``POST /api/v1/tasks/{id}/retry`` on the real database."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient


async def failed_task(
    api: AsyncTestClient[Any], headers: dict[str, str], db: asyncpg.Connection
) -> str:
    created = await api.post(
        "/api/v1/tasks", json={"title": "t", "max_attempts": 2}, headers=headers
    )
    task_id: str = created.json()["id"]
    await db.execute(
        "UPDATE tasks SET status = 'FAILED', attempts = 2, error = 'boom',"
        " started_at = now(), completed_at = now() WHERE id = $1",
        uuid.UUID(task_id),
    )
    return task_id


async def test_a_failed_task_is_pending_again_with_a_retry_message(
    api: AsyncTestClient[Any], alice: dict[str, str], db: asyncpg.Connection
) -> None:
    task_id = await failed_task(api, alice, db)

    response = await api.post(
        f"/api/v1/tasks/{task_id}/retry",
        headers={**alice, "X-Request-ID": "req-retry"},
    )

    assert response.status_code == 200, response.text
    task = response.json()
    assert task["status"] == "PENDING"
    assert task["attempts"] == 0 and task["max_attempts"] == 2
    assert task["error"] is None
    assert task["started_at"] is None and task["completed_at"] is None
    stored = await db.fetchrow("SELECT * FROM tasks WHERE id = $1", uuid.UUID(task_id))
    assert stored is not None and stored["status"] == "PENDING"

    row = await db.fetchrow(
        "SELECT * FROM outbox WHERE routing_key = 'task.retry' AND correlation_id = $1",
        task_id,
    )
    assert row is not None
    assert json.loads(row["body"]) == {
        "task_id": task_id,
        "type": "checksum",
        "status": "PENDING",
    }
    assert json.loads(row["headers"])["x-request-id"] == "req-retry"
    assert row["published_at"] is None


@pytest.mark.parametrize(
    "status", ["NEW", "PENDING", "IN_PROGRESS", "COMPLETED", "CANCELLED"]
)
async def test_any_other_status_is_409_and_changes_nothing(
    api: AsyncTestClient[Any],
    alice: dict[str, str],
    db: asyncpg.Connection,
    status: str,
) -> None:
    task_id = await failed_task(api, alice, db)
    await db.execute("UPDATE tasks SET status = $1", status)
    before = await db.fetchrow("SELECT * FROM tasks")

    response = await api.post(f"/api/v1/tasks/{task_id}/retry", headers=alice)

    assert response.status_code == 409
    assert response.json()["type"] == "/problems/task-state-conflict"
    assert await db.fetchrow("SELECT * FROM tasks") == before
    assert await db.fetchval("SELECT count(*) FROM outbox") == 1


async def test_a_second_retry_is_409(
    api: AsyncTestClient[Any], alice: dict[str, str], db: asyncpg.Connection
) -> None:
    task_id = await failed_task(api, alice, db)

    first = await api.post(f"/api/v1/tasks/{task_id}/retry", headers=alice)
    second = await api.post(f"/api/v1/tasks/{task_id}/retry", headers=alice)

    assert (first.status_code, second.status_code) == (200, 409)
    retries = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'task.retry'"
    )
    assert retries == 1


async def test_unknown_and_foreign_tasks_are_404(
    api: AsyncTestClient[Any],
    alice: dict[str, str],
    bob: dict[str, str],
    admin: dict[str, str],
    db: asyncpg.Connection,
) -> None:
    task_id = await failed_task(api, alice, db)

    unknown = await api.post(f"/api/v1/tasks/{uuid.uuid4()}/retry", headers=alice)
    foreign = await api.post(f"/api/v1/tasks/{task_id}/retry", headers=bob)
    by_admin = await api.post(f"/api/v1/tasks/{task_id}/retry", headers=admin)

    assert unknown.status_code == foreign.status_code == 404
    assert by_admin.status_code == 200
