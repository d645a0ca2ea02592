"""Per-principal rate limits in the shared Redis store."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from service.app import create_app
from service.errors import RateLimitedError
from service.rate_limit import PrincipalRateLimiter
from service.registry import load_registry
from service.settings import ServiceSettings

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def limited(api_settings: ServiceSettings) -> ServiceSettings:
    """Five requests a minute, counted under a key prefix only this test uses."""
    return msgspec.structs.replace(
        api_settings,
        api_rate_limit_per_minute=5,
        rate_limit_storage_url=REDIS_URL,
        rate_limit_key_prefix=f"test-{secrets.token_hex(6)}",
    )


async def clients(
    stack: AsyncExitStack, settings: ServiceSettings, replicas: int
) -> list[AsyncTestClient[Any]]:
    """Separate app instances, as separate API replicas would be."""
    return [
        await stack.enter_async_context(
            AsyncTestClient(create_app(settings, load_registry()))
        )
        for _ in range(replicas)
    ]


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def test_over_the_rate_is_429_with_retry_after(
    stack: AsyncExitStack, limited: ServiceSettings, alice: dict[str, str]
) -> None:
    (api,) = await clients(stack, limited, 1)

    statuses = [
        (await api.get("/api/v1/tasks", headers=alice)).status_code for _ in range(5)
    ]
    refused = await api.get("/api/v1/tasks", headers=alice)

    assert statuses == [200] * 5
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["type"] == "/problems/rate-limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60


async def test_the_limit_holds_across_replicas_and_per_principal(
    stack: AsyncExitStack,
    limited: ServiceSettings,
    alice: dict[str, str],
    bob: dict[str, str],
) -> None:
    first, second = await clients(stack, limited, 2)

    statuses = [
        (await api.get("/api/v1/tasks", headers=alice)).status_code
        for api in (first, second, first, second, first)
    ]
    refused_by_first = await first.get("/api/v1/tasks", headers=alice)
    refused_by_second = await second.get("/api/v1/tasks", headers=alice)
    other_principal = await second.get("/api/v1/tasks", headers=bob)

    assert statuses == [200] * 5
    assert refused_by_first.status_code == refused_by_second.status_code == 429
    assert other_principal.status_code == 200


async def test_requests_without_a_valid_key_are_not_counted_for_anyone(
    stack: AsyncExitStack, limited: ServiceSettings, alice: dict[str, str]
) -> None:
    (api,) = await clients(stack, limited, 1)

    for _ in range(10):
        assert (await api.get("/api/v1/tasks")).status_code == 401

    assert (await api.get("/api/v1/tasks", headers=alice)).status_code == 200


async def test_an_unreachable_store_lets_requests_through_with_a_warning(
    stack: AsyncExitStack, limited: ServiceSettings, alice: dict[str, str]
) -> None:
    down = msgspec.structs.replace(
        limited, rate_limit_storage_url="redis://127.0.0.1:1/0"
    )
    (api,) = await clients(stack, down, 1)

    with capture_logs() as logs:
        statuses = [
            (await api.get("/api/v1/tasks", headers=alice)).status_code
            for _ in range(8)
        ]

    assert statuses == [200] * 8
    warnings = [e for e in logs if e["event"] == "rate_limit_unavailable"]
    assert len(warnings) == 8
    assert all(e["log_level"] == "warning" for e in warnings)


async def test_zero_turns_the_limit_off(
    stack: AsyncExitStack, limited: ServiceSettings, alice: dict[str, str]
) -> None:
    off = msgspec.structs.replace(
        limited,
        api_rate_limit_per_minute=0,
        rate_limit_storage_url="redis://127.0.0.1:1/0",
    )
    (api,) = await clients(stack, off, 1)

    with capture_logs() as logs:
        for _ in range(8):
            assert (await api.get("/api/v1/tasks", headers=alice)).status_code == 200

    assert not [e for e in logs if e["event"] == "rate_limit_unavailable"]


async def test_a_burst_admits_exactly_the_limit(limited: ServiceSettings) -> None:
    limiter = PrincipalRateLimiter.from_settings(limited)
    assert limiter is not None

    async def admitted(principal: str) -> bool:
        try:
            await limiter.hit(principal)
        except RateLimitedError:
            return False
        return True

    # Concurrent requests share calls to Redis; the count must not suffer.
    first = await asyncio.gather(*(admitted("carol") for _ in range(12)))
    second = await asyncio.gather(*(admitted(name) for name in ["carol", "dan"] * 4))

    assert first == [True] * 5 + [False] * 7
    assert second == [False, True] * 4
