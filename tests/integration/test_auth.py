"""API keys, scopes and tenants, on the real database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from service.api_keys import Scope
from tests.conftest import ROOT
from tests.support.keys import bearer, create_key

#: A value for every path parameter the v1 routes have.
PATH_VALUES = {"task_id": "00000000-0000-4000-8000-000000000000"}


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


def api_operations(app: Litestar) -> list[tuple[str, str]]:
    """Every (method, path) the app serves under /api/v1, from its routing table."""
    operations = []
    for route in app.routes:
        if not route.path.startswith("/api/v1") or not isinstance(route, HTTPRoute):
            continue
        path = route.path
        for name, value in PATH_VALUES.items():
            path = path.replace(f"{{{name}:uuid}}", value)
        assert "{" not in path, f"no test value for a parameter of {route.path}"
        operations += [(method, path) for method in sorted(route.methods)]
    return operations


def secret(key: str) -> str:
    """The part of ``otk_<key id>_<secret>`` that must never be shown again."""
    return key[len("otk_0123456789abcdef_") :]


async def create(api: AsyncTestClient[Any], headers: dict[str, str]) -> str:
    response = await api.post("/api/v1/tasks", json={"title": "t"}, headers=headers)
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


async def test_no_api_route_answers_without_a_valid_key(
    api: AsyncTestClient[Any],
    api_app: Litestar,
    database_url: str,
    db: asyncpg.Connection,
) -> None:
    operations = api_operations(api_app)
    assert ("POST", "/api/v1/tasks") in operations
    assert len(operations) >= 7
    revoked = await create_key(database_url, "gone")
    await db.execute("UPDATE api_keys SET revoked_at = now()")

    for method, path in operations:
        for headers in ({}, {"Authorization": "Bearer nonsense"}, bearer(revoked)):
            response = await api.request(method, path, headers=headers, json={})
            body = assert_problem(response, 401)
            assert body["type"] == "/problems/unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert await db.fetchval("SELECT count(*) FROM tasks") == 0


async def test_health_metrics_and_schema_need_no_key(
    api: AsyncTestClient[Any],
) -> None:
    for path in ("/health/live", "/health/ready", "/metrics", "/schema/openapi.json"):
        assert (await api.get(path)).status_code == 200, path


MALFORMED_AUTHORIZATION = [
    "",
    "Bearer",
    "Bearer ",
    "bearer",
    "Basic dXNlcjpwYXNz",
    "Token otk_0123456789abcdef_" + "a" * 43,
    "Bearer otk_0123456789abcdef_" + "a" * 43,
    "Bearer otk_0123456789abcdef_" + "a" * 42,
    "Bearer otk_0123456789ABCDEF_" + "a" * 43,
    "Bearer otk_0123456789abcdef_" + "a" * 43 + " extra",
    "Bearer " + "x" * 10_000,
    "Bearer otk_' OR '1'='1",
    "Bearer ÿÿÿ",
    "Bearer\totk_0123456789abcdef_" + "a" * 43,
]


@pytest.mark.parametrize("value", MALFORMED_AUTHORIZATION)
async def test_malformed_authorization_headers_are_401(
    api: AsyncTestClient[Any], value: str
) -> None:
    response = await api.get(
        "/api/v1/tasks", headers={"Authorization": value.encode("latin-1")}
    )

    assert_problem(response, 401)
    assert "otk_" not in response.text


async def test_the_bearer_scheme_is_case_insensitive(
    api: AsyncTestClient[Any], alice: dict[str, str]
) -> None:
    key = alice["Authorization"].split(" ", 1)[1]

    response = await api.get(
        "/api/v1/tasks", headers={"Authorization": f"bEaReR {key}"}
    )

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("scopes", "allowed"),
    [
        ([Scope.TASKS_READ], {"read"}),
        ([Scope.TASKS_WRITE], {"write"}),
        ([Scope.TASKS_READ, Scope.TASKS_WRITE], {"read", "write"}),
        ([Scope.ADMIN], {"read", "write"}),
    ],
)
async def test_each_route_needs_its_scope(
    api: AsyncTestClient[Any],
    database_url: str,
    db: asyncpg.Connection,
    scopes: list[Scope],
    allowed: set[str],
) -> None:
    headers = bearer(await create_key(database_url, "scoped", scopes))
    owner = bearer(await create_key(database_url, "scoped", [Scope.ADMIN]))
    task_id = await create(api, owner)
    await db.execute("UPDATE tasks SET status = 'FAILED'")
    calls = {
        "read": [
            ("GET", "/api/v1/tasks"),
            ("GET", f"/api/v1/tasks/{task_id}"),
            ("GET", f"/api/v1/tasks/{task_id}/status"),
            ("GET", "/api/v1/task-types"),
        ],
        # Retry before cancel: the task is FAILED, so retry succeeds first.
        "write": [
            ("POST", "/api/v1/tasks"),
            ("POST", f"/api/v1/tasks/{task_id}/retry"),
            ("DELETE", f"/api/v1/tasks/{task_id}"),
        ],
    }

    for kind, operations in calls.items():
        for method, path in operations:
            response = await api.request(
                method, path, headers=headers, json={"title": "t"}
            )
            if kind in allowed:
                assert response.status_code in (200, 201), (method, path, response)
            else:
                body = assert_problem(response, 403)
                assert body["type"] == "/problems/forbidden"


async def test_revocation_takes_effect_on_the_next_request(
    api: AsyncTestClient[Any], alice: dict[str, str], database_url: str
) -> None:
    assert (await api.get("/api/v1/tasks", headers=alice)).status_code == 200

    await run_cli(database_url, "api-keys", "revoke", "alice")

    assert_problem(await api.get("/api/v1/tasks", headers=alice), 401)


async def test_tasks_of_another_principal_are_not_found(
    api: AsyncTestClient[Any],
    alice: dict[str, str],
    bob: dict[str, str],
    db: asyncpg.Connection,
) -> None:
    mine = await create(api, alice)
    theirs = await create(api, bob)
    await db.execute(
        "UPDATE tasks SET status = 'FAILED' WHERE id = $1", uuid.UUID(theirs)
    )

    for method, suffix in [
        ("GET", ""),
        ("GET", "/status"),
        ("DELETE", ""),
        ("POST", "/retry"),
    ]:
        response = await api.request(
            method, f"/api/v1/tasks/{theirs}{suffix}", headers=alice
        )
        body = assert_problem(response, 404)
        assert body["type"] == "/problems/task-not-found"

    listed = (await api.get("/api/v1/tasks", headers=alice)).json()["items"]
    assert [task["id"] for task in listed] == [mine]
    status = await db.fetchval(
        "SELECT status FROM tasks WHERE id = $1", uuid.UUID(theirs)
    )
    assert status == "FAILED"
    assert await db.fetchval("SELECT count(*) FROM outbox") == 2


async def test_admin_sees_and_acts_on_every_principals_tasks(
    api: AsyncTestClient[Any],
    alice: dict[str, str],
    bob: dict[str, str],
    admin: dict[str, str],
    db: asyncpg.Connection,
) -> None:
    first = await create(api, alice)
    second = await create(api, bob)
    await db.execute(
        "INSERT INTO tasks (id, title, type, payload, priority, status, max_attempts)"
        " VALUES (gen_random_uuid(), 'old', 'checksum', '{}', 'LOW', 'NEW', 1)"
    )

    listed = (await api.get("/api/v1/tasks", headers=admin)).json()["items"]
    one = await api.get(f"/api/v1/tasks/{first}", headers=admin)
    cancelled = await api.delete(f"/api/v1/tasks/{second}", headers=admin)

    assert len(listed) == 3
    assert one.status_code == 200
    assert cancelled.json()["status"] == "CANCELLED"
    owners = await db.fetch("SELECT owner FROM tasks ORDER BY owner")
    assert [row["owner"] for row in owners] == ["alice", "bob", "legacy"]


async def test_keys_are_stored_only_as_hashes(
    database_url: str, db: asyncpg.Connection
) -> None:
    key = await create_key(database_url, "carol")

    row = await db.fetchrow("SELECT * FROM api_keys")
    assert row is not None
    assert secret(key) not in str(dict(row))
    assert row["key_id"] == key.split("_")[1]
    assert row["name"] == "carol"
    assert sorted(row["scopes"]) == ["tasks:read", "tasks:write"]


async def test_keys_never_reach_the_logs(
    api: AsyncTestClient[Any], alice: dict[str, str], database_url: str
) -> None:
    revoked = await create_key(database_url, "dave")
    await run_cli(database_url, "api-keys", "revoke", "dave")
    keys = [alice["Authorization"].removeprefix("Bearer "), revoked]

    with capture_logs() as logs:
        await api.get("/api/v1/tasks", headers=alice)
        await api.get("/api/v1/tasks", headers=bearer(revoked))
        await api.post("/api/v1/tasks", headers=alice, content=b"{")
        await api.get("/api/v1/tasks", headers={"Authorization": "Basic c2VjcmV0"})

    text = repr(logs)
    assert len(logs) == 4
    assert not any(secret(key) in text for key in keys)
    assert "c2VjcmV0" not in text


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "API_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=Path(ROOT),
        env={**env, "DATABASE_URL": database_url, "LOG_JSON": "true"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def run_cli(database_url: str, *args: str) -> str:
    done = await asyncio.to_thread(cli, database_url, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_cli_creates_lists_and_revokes_keys(
    api: AsyncTestClient[Any], database_url: str
) -> None:
    key = (await run_cli(database_url, "api-keys", "create", "erin")).strip()
    reader = (
        await run_cli(
            database_url, "api-keys", "create", "erin", "--scope", "tasks:read"
        )
    ).strip()
    key_id = key.split("_")[1]

    listing = await run_cli(database_url, "api-keys", "list")
    created = await api.post("/api/v1/tasks", json={"title": "t"}, headers=bearer(key))
    refused = await api.post(
        "/api/v1/tasks", json={"title": "t"}, headers=bearer(reader)
    )
    await run_cli(database_url, "api-keys", "revoke", key_id)
    after = await api.get("/api/v1/tasks", headers=bearer(key))
    still = await api.get("/api/v1/tasks", headers=bearer(reader))

    assert key.startswith("otk_") and len(key) == 64
    assert key_id in listing and "erin" in listing and "tasks:write" in listing
    assert secret(key) not in listing
    assert created.status_code == 201
    assert_problem(refused, 403)
    assert_problem(after, 401)
    assert still.status_code == 200


async def test_cli_refuses_bad_names_scopes_and_unknown_keys(
    database_url: str,
) -> None:
    bad_name = await asyncio.to_thread(
        cli, database_url, "api-keys", "create", "no spaces"
    )
    bad_scope = await asyncio.to_thread(
        cli, database_url, "api-keys", "create", "x", "--scope", "root"
    )
    unknown = await asyncio.to_thread(cli, database_url, "api-keys", "revoke", "nobody")

    assert bad_name.returncode == 2 and "NAME" in bad_name.stderr
    assert bad_scope.returncode == 2
    assert unknown.returncode == 1 and "nobody" in unknown.stderr
