"""The whole API fuzzed from its own OpenAPI document, in-process, on a real database.

Schemathesis generates requests for every documented operation, both valid
ones and ones that break the schema, and sends them with an admin key. Every
answer must be a documented status with a documented content type and body,
and never a server error. The run is bounded (examples per operation, no
deadline) so it stays well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from litestar import Litestar
from litestar.serialization import encode_json
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.registry import load_registry
from service.settings import ServiceSettings

CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


#: The document does not depend on the database, so any instance can give it;
#: each test then calls an app on its own database.
schema = schemathesis.openapi.from_dict(
    msgspec.json.decode(
        encode_json(
            create_app(ServiceSettings(), load_registry()).openapi_schema.to_schema()
        )
    )
)


@pytest.fixture
def fuzzed_app(api_app: Litestar) -> Iterator[Litestar]:
    yield api_app
    # Schemathesis keeps an app's lifespan running for the whole session;
    # stop it while this test's database still exists.
    shutdown_lifespans()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_every_operation_answers_as_documented(
    case: schemathesis.Case, fuzzed_app: Litestar, admin: dict[str, str]
) -> None:
    case.call_and_validate(app=fuzzed_app, headers=admin, checks=CHECKS)
