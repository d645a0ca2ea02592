from __future__ import annotations

from datetime import UTC, datetime

import aio_pika
import pytest

from outbox_relay.errors import PublishError
from outbox_relay.publisher import build_message, events_exchange_name
from outbox_relay.queries import OutboxRow

CREATED_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def row(**overrides: object) -> OutboxRow:
    values: dict[str, object] = {
        "id": 42,
        "routing_key": "task.created",
        "body": '{"task_id": "t-1"}',
        "headers": '{"traceparent": "00-abc-def-01", "x-request-id": "req-1"}',
        "correlation_id": "t-1",
        "created_at": CREATED_AT,
        "attempts": 0,
    }
    values.update(overrides)
    return OutboxRow(**values)  # type: ignore[arg-type]


def test_message_carries_the_row_as_amqp_properties() -> None:
    message = build_message(row())

    assert message.body == b'{"task_id": "t-1"}'
    assert message.message_id == "42"
    assert message.correlation_id == "t-1"
    assert message.type == "task.created"
    assert message.timestamp == CREATED_AT
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers == {"traceparent": "00-abc-def-01", "x-request-id": "req-1"}


def test_a_row_without_correlation_id_has_none() -> None:
    assert build_message(row(correlation_id=None)).correlation_id is None


@pytest.mark.parametrize("headers", ["[]", '"text"', "not json"])
def test_headers_that_are_not_an_object_fail_the_row(headers: str) -> None:
    with pytest.raises(PublishError, match="headers"):
        build_message(row(headers=headers))


def test_exchange_name_starts_with_the_prefix() -> None:
    assert events_exchange_name("tasks") == "tasks.events"


def test_a_body_over_the_limit_fails_the_row_before_it_is_sent() -> None:
    body = '{"text": "' + "x" * 100 + '"}'

    assert build_message(row(body=body), max_body_bytes=len(body)).body
    with pytest.raises(PublishError, match=r"oversize.*RELAY_MAX_MESSAGE_BYTES"):
        build_message(row(body=body), max_body_bytes=len(body) - 1)


def test_headers_too_large_for_one_frame_fail_the_row() -> None:
    headers = '{"big": "' + "x" * (64 * 1024) + '"}'

    with pytest.raises(PublishError, match="headers"):
        build_message(row(headers=headers))
