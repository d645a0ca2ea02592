"""The HTTP API in-process against a real PostgreSQL database.

Most tests call it as one principal with the default scopes; keys, scopes
and tenants have their own tests in ``test_auth``.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from prometheus_client import CONTENT_TYPE_LATEST

from service import queries
from service.app import create_app
from service.handlers import checksum_of
from service.settings import ServiceSettings


@pytest.fixture
async def client(
    api: AsyncTestClient[Any], alice: dict[str, str]
) -> AsyncIterator[AsyncTestClient[Any]]:
    """The API, called with a key of principal ``alice``."""
    api.headers.update(alice)
    yield api


async def counts(db: asyncpg.Connection) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM tasks) AS tasks,"
        " (SELECT count(*) FROM outbox) AS outbox"
    )
    assert row is not None
    return row["tasks"], row["outbox"]


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"] and body["title"] and body["detail"]
    return body


async def test_create_stores_task_and_outbox_row_together(
    client: AsyncTestClient[Any], db: asyncpg.Connection
) -> None:
    response = await client.post(
        "/api/v1/tasks",
        json={"title": "hash it", "payload": {"text": "abc"}, "priority": "HIGH"},
        headers={"X-Request-ID": "req-42"},
    )

    assert response.status_code == 201, response.text
    task = response.json()
    assert response.headers["location"] == f"/api/v1/tasks/{task['id']}"
    assert response.headers["x-request-id"] == "req-42"
    assert task["status"] == "NEW"
    assert task["type"] == "checksum"
    assert task["payload"] == {"text": "abc", "rounds": 1}
    assert task["priority"] == "HIGH"
    assert task["attempts"] == 0 and task["max_attempts"] == 3

    rows = await db.fetch("SELECT * FROM outbox")
    assert len(rows) == 1
    assert rows[0]["routing_key"] == "task.created"
    assert rows[0]["correlation_id"] == task["id"]
    assert '"x-request-id": "req-42"' in rows[0]["headers"]
    assert rows[0]["published_at"] is None


async def test_run_at_becomes_the_outbox_rows_not_before_time(
    client: AsyncTestClient[Any], db: asyncpg.Connection
) -> None:
    response = await client.post(
        "/api/v1/tasks",
        json={"title": "later", "run_at": "2099-01-01T00:00:00+00:00"},
    )

    assert response.status_code == 201
    available_at = await db.fetchval("SELECT available_at FROM outbox")
    assert available_at.year == 2099


async def test_read_one_and_its_status(client: AsyncTestClient[Any]) -> None:
    created = (await client.post("/api/v1/tasks", json={"title": "t"})).json()

    one = await client.get(f"/api/v1/tasks/{created['id']}")
    status = await client.get(f"/api/v1/tasks/{created['id']}/status")

    assert one.status_code == 200 and one.json() == created
    assert status.json() == {
        "id": created["id"],
        "status": "NEW",
        "updated_at": created["updated_at"],
    }


async def test_list_pages_through_everything_once_with_filters(
    client: AsyncTestClient[Any],
) -> None:
    for i in range(7):
        priority = "HIGH" if i % 2 else "LOW"
        await client.post(
            "/api/v1/tasks", json={"title": f"t{i}", "priority": priority}
        )
    await client.post(
        "/api/v1/tasks", json={"title": "s", "type": "sleep", "payload": {"seconds": 1}}
    )

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "priority": "HIGH"}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/api/v1/tasks", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        assert all(item["priority"] == "HIGH" for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert len(seen) == len(set(seen)) == 3
    by_type = (await client.get("/api/v1/tasks", params={"type": "sleep"})).json()
    assert [item["title"] for item in by_type["items"]] == ["s"]
    newest_first = (await client.get("/api/v1/tasks")).json()["items"]
    assert [item["title"] for item in newest_first][:2] == ["s", "t6"]


async def test_cancel_keeps_the_row_and_announces_it(
    client: AsyncTestClient[Any], db: asyncpg.Connection
) -> None:
    created = (await client.post("/api/v1/tasks", json={"title": "t"})).json()

    cancelled = await client.delete(f"/api/v1/tasks/{created['id']}")
    again = await client.delete(f"/api/v1/tasks/{created['id']}")

    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "CANCELLED"
    assert cancelled.json()["completed_at"] is not None
    assert_problem(again, 409)
    keys = await db.fetch("SELECT routing_key FROM outbox ORDER BY id")
    assert [r["routing_key"] for r in keys] == ["task.created", "task.cancelled"]


@pytest.mark.parametrize("final", ["COMPLETED", "FAILED"])
async def test_cancel_of_a_finished_task_is_409_and_changes_nothing(
    client: AsyncTestClient[Any], db: asyncpg.Connection, final: str
) -> None:
    created = (await client.post("/api/v1/tasks", json={"title": "t"})).json()
    await db.execute(
        "UPDATE tasks SET status = $1 WHERE id = $2", final, uuid.UUID(created["id"])
    )

    response = await client.delete(f"/api/v1/tasks/{created['id']}")

    assert_problem(response, 409)
    assert await db.fetchval("SELECT status FROM tasks") == final
    assert await db.fetchval("SELECT count(*) FROM outbox") == 1


async def test_task_types_publish_their_payload_schemas(
    client: AsyncTestClient[Any],
) -> None:
    types = {t["name"]: t for t in (await client.get("/api/v1/task-types")).json()}

    assert {"checksum", "sleep"} <= set(types)
    assert "seconds" in str(types["sleep"]["payload_schema"])


UNKNOWN = "00000000-0000-4000-8000-000000000000"
FORGED_CURSOR = (
    base64.urlsafe_b64encode(
        b'["9999-12-31T23:59:59.999999-23:59","' + UNKNOWN.encode() + b'"]'
    )
    .decode()
    .rstrip("=")
)

BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int]] = [
    ("POST", "/api/v1/tasks", {"content": b"{not json"}, 400),
    ("POST", "/api/v1/tasks", {"content": b""}, 400),
    ("POST", "/api/v1/tasks", {"json": []}, 422),
    ("POST", "/api/v1/tasks", {"json": {}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": ""}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": "x" * 201}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": 5}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": "t", "priority": "URGENT"}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": "t", "type": "nope"}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": "t", "payload": []}}, 422),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"title": "t", "type": "sleep", "payload": {"seconds": "x"}}},
        422,
    ),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"title": "t", "type": "sleep", "payload": {"seconds": -1}}},
        422,
    ),
    ("POST", "/api/v1/tasks", {"json": {"title": "t", "type": "sleep"}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": "t", "payload": {"x": 1}}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": "t", "max_attempts": 0}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": "t", "max_attempts": 10**30}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": "t", "run_at": "tomorrow"}}, 422),
    ("POST", "/api/v1/tasks", {"json": {"title": "t", "unknown": 1}}, 422),
    ("POST", "/api/v1/tasks", {"content": b'{"title": "' + b"x" * 70_000 + b'"}'}, 413),
    ("GET", "/api/v1/tasks", {"params": {"cursor": "garbage"}}, 400),
    ("GET", "/api/v1/tasks", {"params": {"cursor": "WyJ4IiwieSJd"}}, 400),
    # A well-formed cursor whose time overflows once moved to UTC.
    ("GET", "/api/v1/tasks", {"params": {"cursor": FORGED_CURSOR}}, 400),
    ("GET", "/api/v1/tasks", {"params": {"limit": 0}}, 400),
    ("GET", "/api/v1/tasks", {"params": {"limit": 10_000}}, 400),
    ("GET", "/api/v1/tasks", {"params": {"limit": "ten"}}, 400),
    ("GET", "/api/v1/tasks", {"params": {"status": "DONE"}}, 400),
    ("GET", "/api/v1/tasks", {"params": {"created_after": "yesterday"}}, 400),
    ("GET", f"/api/v1/tasks/{UNKNOWN}", {}, 404),
    ("GET", "/api/v1/tasks/not-a-uuid", {}, 404),
    ("GET", f"/api/v1/tasks/{UNKNOWN}/status", {}, 404),
    ("DELETE", f"/api/v1/tasks/{UNKNOWN}", {}, 404),
    ("DELETE", "/api/v1/tasks/not-a-uuid", {}, 404),
    ("PUT", "/api/v1/tasks", {"json": {"title": "t"}}, 405),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), BAD_REQUESTS)
async def test_bad_input_is_a_problem_response_and_changes_nothing(
    client: AsyncTestClient[Any],
    db: asyncpg.Connection,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
) -> None:
    before = await counts(db)
    if "content" in kwargs:
        kwargs = {**kwargs, "headers": {"content-type": "application/json"}}

    response = await client.request(method, path, **kwargs)

    assert_problem(response, status)
    assert await counts(db) == before


async def test_validation_problems_name_the_offending_field(
    client: AsyncTestClient[Any],
) -> None:
    response = await client.post(
        "/api/v1/tasks",
        json={"title": "t", "type": "sleep", "payload": {"seconds": "soon"}},
    )

    body = assert_problem(response, 422)
    assert body["errors"][0]["field"] == "payload.seconds"


async def test_database_down_is_503_not_a_hang() -> None:
    settings = ServiceSettings(database_url="postgresql://postgres@127.0.0.1:1/none")
    # Well-formed, so that checking it needs the database.
    key = "otk_0123456789abcdef_" + "k" * 43
    async with AsyncTestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
        post = await client.post("/api/v1/tasks", json={"title": "t"})
        listing = await client.get("/api/v1/tasks")

    assert_problem(ready, 503)
    assert live.status_code == 200
    assert_problem(post, 503)
    assert post.headers["retry-after"]
    assert_problem(listing, 503)


async def test_openapi_describes_every_route_body_and_error(
    client: AsyncTestClient[Any],
) -> None:
    document = (await client.get("/schema/openapi.json")).json()
    paths = document["paths"]

    assert {
        "/api/v1/tasks",
        "/api/v1/tasks/{task_id}",
        "/api/v1/tasks/{task_id}/status",
        "/api/v1/tasks/{task_id}/retry",
        "/api/v1/task-types",
        "/health/live",
        "/health/ready",
        "/metrics",
    } <= set(paths)
    create = paths["/api/v1/tasks"]["post"]
    assert "requestBody" in create
    assert {"201", "400", "401", "403", "413", "422", "429", "500"} <= set(
        create["responses"]
    )
    assert "Idempotency-Key" in {p["name"] for p in create["parameters"]}
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    for path, operations in paths.items():
        for operation in operations.values():
            secured = path.startswith("/api/v1/")
            assert ("security" in operation) == secured, path
            if secured:
                assert {"401", "403", "429"} <= set(operation["responses"]), path
    problem = create["responses"]["422"]["content"]
    assert "application/problem+json" in problem
    assert {"404", "409"} <= set(
        paths["/api/v1/tasks/{task_id}"]["delete"]["responses"]
    )


async def test_metrics_count_requests_by_route(client: AsyncTestClient[Any]) -> None:
    await client.post("/api/v1/tasks", json={"title": "t"})

    response = await client.get("/metrics")
    text = response.text

    assert response.headers.get_list("content-type") == [CONTENT_TYPE_LATEST]
    assert "outbox_tasks_api_requests_total" in text
    assert 'path="/api/v1/tasks"' in text


async def test_refusals_carry_a_request_id_and_are_counted_as_what_they_are(
    api: AsyncTestClient[Any],
) -> None:
    refused = await api.post(
        "/api/v1/tasks", json={"title": "t"}, headers={"X-Request-ID": "req-refused"}
    )
    unrouted = await api.get("/no/such/route", headers={"X-Request-ID": "req-404"})

    assert_problem(refused, 401)
    assert refused.headers["x-request-id"] == "req-refused"
    assert unrouted.status_code == 404
    assert unrouted.headers["x-request-id"] == "req-404"
    text = (await api.get("/metrics")).text
    assert (
        'outbox_tasks_api_requests_total{method="POST",path="/api/v1/tasks",'
        'status_code="401"}' in text
    )
    assert 'path="/api/v1/tasks",status_code="500"' not in text


def test_checksum_result_is_deterministic() -> None:
    assert checksum_of("abc") == checksum_of("abc")
    assert checksum_of("abc")["sha256"] != checksum_of("abc", rounds=2)["sha256"]


async def test_every_hot_path_statement_prepares_against_the_migrated_schema(
    db: asyncpg.Connection,
) -> None:
    assert queries.ALL, "no statements registered"
    for name, sql in queries.ALL.items():
        try:
            await db.prepare(sql)
        except asyncpg.PostgresError as exc:
            pytest.fail(f"statement {name} does not prepare: {exc}")


async def test_submissions_come_back_after_the_database_connections_broke(
    client: AsyncTestClient[Any], alice: dict[str, str], db: asyncpg.Connection
) -> None:
    client.headers.update(alice)
    for _ in range(3):
        assert (
            await client.post("/api/v1/tasks", json={"title": "t"})
        ).status_code == 201

    # Every connection the API holds dies, as when the server restarts.
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'outbox-tasks-api' AND datname = current_database()"
    )
    assert killed >= 1

    # A dead connection may fail one request (503); it is then replaced, not
    # handed out again.
    statuses = [
        (await client.post("/api/v1/tasks", json={"title": "t"})).status_code
        for _ in range(15)
    ]
    assert set(statuses) <= {201, 503}
    assert statuses[-5:] == [201] * 5
