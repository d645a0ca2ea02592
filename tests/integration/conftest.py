"""The API in-process against the test's own database, with keys to call it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from service.api_keys import Scope
from service.app import create_app
from service.registry import load_registry
from service.settings import ServiceSettings
from tests.support.keys import bearer, create_key


@pytest.fixture
def api_settings(database_url: str) -> ServiceSettings:
    """Settings of an API on the test database, without a rate limit."""
    return ServiceSettings(
        database_url=database_url,
        api_max_body_bytes=64_000,
        api_rate_limit_per_minute=0,
    )


@pytest.fixture
def api_app(api_settings: ServiceSettings) -> Litestar:
    return create_app(api_settings, load_registry())


@pytest.fixture
async def api(api_app: Litestar) -> AsyncIterator[AsyncTestClient[Any]]:
    """A client that sends no key unless a request adds one."""
    async with AsyncTestClient(api_app) as client:
        yield client


@pytest.fixture
async def alice(database_url: str) -> dict[str, str]:
    """Headers of principal ``alice`` (tasks:read, tasks:write)."""
    return bearer(await create_key(database_url, "alice"))


@pytest.fixture
async def bob(database_url: str) -> dict[str, str]:
    """Headers of principal ``bob`` (tasks:read, tasks:write)."""
    return bearer(await create_key(database_url, "bob"))


@pytest.fixture
async def admin(database_url: str) -> dict[str, str]:
    """Headers of principal ``root`` with the admin scope."""
    return bearer(await create_key(database_url, "root", [Scope.ADMIN]))
