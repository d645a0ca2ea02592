from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from service.errors import (
    InvalidCursorError,
    RequestValidationError,
    UnknownTaskTypeError,
)
from service.registry import HandlerRegistry, load_registry, task_type
from service.schemas import TaskCreate
from service.tasks import decode_cursor, encode_cursor, validate_submission


class Payload(msgspec.Struct, forbid_unknown_fields=True):
    n: int


def make_registry() -> HandlerRegistry:
    registry = HandlerRegistry()

    @task_type("count", Payload, registry=registry)
    async def count(payload: Payload, context: object) -> int:
        return payload.n

    return registry


def test_a_payload_is_checked_against_its_types_schema() -> None:
    registry = make_registry()

    name, payload = validate_submission(
        TaskCreate(title="t", type="count", payload={"n": 3}), registry, "count"
    )
    assert (name, payload) == ("count", {"n": 3})

    with pytest.raises(RequestValidationError) as caught:
        validate_submission(
            TaskCreate(title="t", type="count", payload={"n": "three"}),
            registry,
            "count",
        )
    assert caught.value.errors[0][0] == "payload.n"


def test_the_default_type_applies_when_none_is_named() -> None:
    name, _ = validate_submission(
        TaskCreate(title="t", payload={"n": 1}), make_registry(), "count"
    )
    assert name == "count"


def test_unknown_types_and_double_registration_are_refused() -> None:
    registry = make_registry()

    with pytest.raises(UnknownTaskTypeError):
        registry.get("nope")
    with pytest.raises(ValueError, match="already registered"):

        @task_type("count", Payload, registry=registry)
        async def again(payload: Payload, context: object) -> None:
            return None


def test_loading_twice_registers_the_built_ins_once() -> None:
    first = load_registry()
    second = load_registry()

    assert first is second
    assert {"checksum", "sleep"} <= {t.name for t in first}


def test_cursor_round_trip() -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    task_id = uuid.uuid4()

    assert decode_cursor(encode_cursor(created, task_id)) == (created, task_id)


@pytest.mark.parametrize(
    "cursor", ["", "!!!", "bm90IGpzb24", "WyJ4IiwieSJd", "WzEsMl0"]
)
def test_foreign_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(InvalidCursorError):
        decode_cursor(cursor)
