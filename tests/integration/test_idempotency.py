"""``Idempotency-Key`` on task submission, on the real database."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from litestar.testing import AsyncTestClient

BODY = {"title": "once", "payload": {"text": "abc", "rounds": 2}}


async def counts(db: asyncpg.Connection) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM tasks) AS tasks,"
        " (SELECT count(*) FROM outbox) AS outbox"
    )
    assert row is not None
    return row["tasks"], row["outbox"]


async def submit(
    api: AsyncTestClient[Any],
    headers: dict[str, str],
    key: str,
    body: dict[str, Any] = BODY,
) -> Any:
    return await api.post(
        "/api/v1/tasks", json=body, headers={**headers, "Idempotency-Key": key}
    )


async def test_a_replay_returns_the_same_task_and_writes_nothing(
    api: AsyncTestClient[Any], alice: dict[str, str], db: asyncpg.Connection
) -> None:
    first = await submit(api, alice, "k-1")
    # Same body, other key order and spacing: still the same request.
    reordered = {"payload": {"rounds": 2, "text": "abc"}, "title": "once"}
    second = await submit(api, alice, "k-1", reordered)

    assert first.status_code == second.status_code == 201
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert await counts(db) == (1, 1)


async def test_the_same_key_with_another_body_is_422(
    api: AsyncTestClient[Any], alice: dict[str, str], db: asyncpg.Connection
) -> None:
    await submit(api, alice, "k-1")

    response = await submit(api, alice, "k-1", {**BODY, "title": "other"})

    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] == "/problems/idempotency-key-reused"
    assert await counts(db) == (1, 1)


async def test_keys_belong_to_their_principal(
    api: AsyncTestClient[Any],
    alice: dict[str, str],
    bob: dict[str, str],
    db: asyncpg.Connection,
) -> None:
    mine = await submit(api, alice, "shared")
    theirs = await submit(api, bob, "shared", {**BODY, "title": "bob's"})

    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]
    assert await counts(db) == (2, 2)


async def test_concurrent_identical_requests_create_one_task(
    api: AsyncTestClient[Any], alice: dict[str, str], db: asyncpg.Connection
) -> None:
    responses = await asyncio.gather(*(submit(api, alice, "race") for _ in range(50)))

    assert {response.status_code for response in responses} == {201}
    assert len({response.json()["id"] for response in responses}) == 1
    assert await counts(db) == (1, 1)
    replays = [r for r in responses if r.headers.get("idempotent-replayed")]
    assert len(replays) == 49


async def test_an_expired_key_can_name_a_new_request(
    api: AsyncTestClient[Any], alice: dict[str, str], db: asyncpg.Connection
) -> None:
    first = await submit(api, alice, "k-1")
    await db.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"
    )

    again = await submit(api, alice, "k-1", {**BODY, "title": "new"})
    replay = await submit(api, alice, "k-1", {**BODY, "title": "new"})

    assert again.status_code == 201 and "idempotent-replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]
    assert replay.json()["id"] == again.json()["id"]
    assert await counts(db) == (2, 2)


async def test_a_rejected_request_does_not_use_up_its_key(
    api: AsyncTestClient[Any], alice: dict[str, str], db: asyncpg.Connection
) -> None:
    refused = await submit(api, alice, "k-1", {"title": ""})
    accepted = await submit(api, alice, "k-1")

    assert refused.status_code == 422
    assert accepted.status_code == 201
    assert await counts(db) == (1, 1)


async def test_malformed_keys_are_400(
    api: AsyncTestClient[Any], alice: dict[str, str], db: asyncpg.Connection
) -> None:
    for key in ["", "with space", "x" * 256, "tab\there"]:
        response = await submit(api, alice, key)
        assert response.status_code == 400, (key, response.text)
        assert response.json()["type"] == "/problems/invalid-parameter"
    assert await counts(db) == (0, 0)
