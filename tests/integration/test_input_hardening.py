"""Hostile input gets a 4xx problem and changes nothing, on the real database."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.registry import HandlerRegistry, load_registry, task_type
from service.settings import ServiceSettings


@pytest.fixture
def api_settings(api_settings: ServiceSettings) -> ServiceSettings:
    """A small payload limit, well under the body limit, so both can be hit."""
    return msgspec.structs.replace(api_settings, api_max_payload_bytes=2048)


class Document(msgspec.Struct):
    data: Any = None


@pytest.fixture
def api_app(api_settings: ServiceSettings) -> Litestar:
    """The built-in types plus ``document``, whose payload may be any JSON."""
    registry = HandlerRegistry()
    registry.register(load_registry().get("checksum"))

    @task_type("document", Document, registry=registry)
    async def document(payload: Document, context: object) -> None:
        return None

    return create_app(api_settings, registry)


@pytest.fixture
async def client(
    api: AsyncTestClient[Any], alice: dict[str, str]
) -> AsyncIterator[AsyncTestClient[Any]]:
    api.headers.update(alice)
    yield api


def nested(depth: int) -> dict[str, Any]:
    """A payload whose objects nest ``depth`` levels deep (``{}`` is 1)."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def raw(body: str) -> dict[str, Any]:
    return {
        "content": body.encode(),
        "headers": {"content-type": "application/json"},
    }


HOSTILE: list[tuple[str, dict[str, Any], int]] = [
    ("NUL in title", {"json": {"title": "a\x00b"}}, 422),
    ("NUL in description", {"json": {"title": "t", "description": "\x00"}}, 422),
    (
        "NUL in a payload string",
        {"json": {"title": "t", "payload": {"text": "a\x00"}}},
        422,
    ),
    ("NUL in a payload key", {"json": {"title": "t", "payload": {"\x00": 1}}}, 422),
    ("NUL in the type", {"json": {"title": "t", "type": "check\x00sum"}}, 422),
    ("escaped NUL", raw('{"title": "a\\u0000b"}'), 422),
    ("lone surrogate", raw('{"title": "\\ud800"}'), 400),
    ("invalid UTF-8", {"content": b'{"title": "\xff\xfe"}'}, 400),
    ("huge integer", {"json": {"title": "t", "max_attempts": 10**40}}, 422),
    ("huge float", raw('{"title": "t", "max_attempts": 1e400}'), 400),
    (
        "huge payload number",
        raw('{"title": "t", "payload": {"rounds": 1e400}}'),
        400,
    ),
    (
        "payload integer beyond 64 bits",
        {"json": {"title": "t", "payload": {"rounds": 2**70}}},
        422,
    ),
    ("nested one level too deep", {"json": {"title": "t", "payload": nested(33)}}, 422),
    ("nested far too deep", raw('{"title": "t", "payload": ' + "[" * 50_000), 400),
    (
        "nested too deep, well-formed",
        raw('{"title": "t", "payload": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"),
        400,
    ),
    (
        "payload over its byte limit",
        {"json": {"title": "t", "payload": {"text": "x" * 3000}}},
        422,
    ),
    (
        "time past the calendar in UTC",
        {"json": {"title": "t", "run_at": "9999-12-31T23:00:00-05:00"}},
        422,
    ),
    (
        "time before the calendar in UTC",
        {"json": {"title": "t", "run_at": "0001-01-01T00:00:00+05:00"}},
        422,
    ),
    ("a JSON string body", raw('"title"'), 422),
    ("a JSON null body", raw("null"), 422),
]


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [pytest.param(kwargs, status, id=name) for name, kwargs, status in HOSTILE],
)
async def test_hostile_bodies_are_4xx_problems_and_change_nothing(
    client: AsyncTestClient[Any],
    db: asyncpg.Connection,
    kwargs: dict[str, Any],
    status: int,
) -> None:
    response = await client.post("/api/v1/tasks", **kwargs)

    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert await db.fetchval("SELECT count(*) FROM tasks") == 0


HOSTILE_QUERIES: list[dict[str, Any]] = [
    {"type": "a\x00b"},
    {"limit": str(10**40)},
    {"limit": "-1"},
    {"created_after": "9999-12-31T23:00:00-05:00"},
    {"created_before": "0001-01-01T00:00:00+05:00"},
    {"cursor": "\x00"},
    {"cursor": "x" * 201},
    {"status": "😀"},
]


@pytest.mark.parametrize("params", HOSTILE_QUERIES)
async def test_hostile_query_parameters_are_400(
    client: AsyncTestClient[Any], params: dict[str, Any]
) -> None:
    response = await client.get("/api/v1/tasks", params=params)

    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_free_form_payloads_up_to_the_limits_are_stored(
    client: AsyncTestClient[Any], db: asyncpg.Connection
) -> None:
    payloads = [
        {"data": nested(31)},  # with the outer object: 32 levels
        {"data": [2**70, -(2**70), 0.1, 5e-324, "😀", None, True]},
        {"data": "x" * 2000},
    ]

    for payload in payloads:
        response = await client.post(
            "/api/v1/tasks", json={"title": "t", "type": "document", "payload": payload}
        )
        assert response.status_code == 201, response.text
        assert response.json()["payload"] == payload

    assert await db.fetchval("SELECT count(*) FROM tasks") == len(payloads)


async def test_unicode_is_stored_and_returned_unchanged(
    client: AsyncTestClient[Any], db: asyncpg.Connection
) -> None:
    title = "Zürich 東京 🚀 مرحبا e\u0301 \u200b\U0010fffd"
    text = "ẞ" * 500 + "\U0001f600"

    created = await client.post(
        "/api/v1/tasks",
        json={"title": title, "description": title, "payload": {"text": text}},
    )
    read = await client.get(f"/api/v1/tasks/{created.json()['id']}")
    by_type = await client.get("/api/v1/tasks", params={"type": "chécksum 🚀"})

    assert created.status_code == 201, created.text
    assert read.json()["title"] == read.json()["description"] == title
    assert read.json()["payload"]["text"] == text
    assert await db.fetchval("SELECT title FROM tasks") == title
    assert by_type.json()["items"] == []
    assert json.loads(created.content)["title"] == title
