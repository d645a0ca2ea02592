"""The work-message contract: decoding, header propagation, follow-up messages."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from consumer.errors import UnprocessableMessageError
from consumer.messages import (
    TASK_COMPLETED,
    Delivery,
    decode_task_message,
    lifecycle_event,
    retry_message,
)

TASK_ID = uuid.UUID("9a4f5b0e-2d1c-4c8e-9a57-0c3e1f2d4b6a")


def delivery(body: bytes, **overrides: object) -> Delivery:
    values: dict[str, object] = {
        "message_id": "42",
        "routing_key": "task.created",
        "body": body,
    }
    values.update(overrides)
    return Delivery(**values)  # type: ignore[arg-type]


def test_a_valid_body_decodes() -> None:
    body = f'{{"task_id": "{TASK_ID}", "type": "checksum"}}'.encode()

    message = decode_task_message(delivery(body))

    assert message.task_id == TASK_ID
    assert message.type == "checksum"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "body is not JSON"),
        (b'{"type": "checksum"}', "invalid body"),
        (b'{"task_id": "not-a-uuid", "type": "checksum"}', "invalid body"),
        (b"[]", "invalid body"),
    ],
)
def test_a_bad_body_is_unprocessable(body: bytes, reason: str) -> None:
    with pytest.raises(UnprocessableMessageError) as caught:
        decode_task_message(delivery(body))

    assert caught.value.reason.startswith(reason)


def test_a_message_without_id_is_unprocessable() -> None:
    body = f'{{"task_id": "{TASK_ID}", "type": "checksum"}}'.encode()

    with pytest.raises(UnprocessableMessageError, match="message_id"):
        decode_task_message(delivery(body, message_id=None))


def test_only_trace_and_request_id_headers_propagate() -> None:
    headers = {
        "traceparent": b"00-abc-def-01",
        "x-request-id": "req-1",
        "x-delivery-count": 2,
        "authorization": "secret",
    }

    item = delivery(b"{}", headers=headers)

    assert item.propagated_headers() == {
        "traceparent": "00-abc-def-01",
        "x-request-id": "req-1",
    }
    assert item.request_id == "req-1"
    assert item.delivery_count == 2


def test_first_delivery_counts_zero() -> None:
    assert delivery(b"{}").delivery_count == 0
    assert delivery(b"{}", headers={"x-delivery-count": "x"}).delivery_count == 0


def test_follow_up_messages_carry_task_id_and_headers() -> None:
    headers = {"x-request-id": "req-1"}
    due = datetime(2030, 1, 1, tzinfo=UTC)

    completed = lifecycle_event(
        TASK_COMPLETED,
        task_id=TASK_ID,
        task_type="checksum",
        status="COMPLETED",
        attempts=2,
        headers=headers,
    )
    retry = retry_message(
        task_id=TASK_ID, task_type="checksum", available_at=due, headers=headers
    )

    assert completed.body == {
        "task_id": str(TASK_ID),
        "type": "checksum",
        "status": "COMPLETED",
        "attempts": 2,
    }
    assert completed.correlation_id == str(TASK_ID)
    assert completed.headers == headers
    assert retry.routing_key == "task.retry"
    assert retry.body == {"task_id": str(TASK_ID), "type": "checksum"}
    assert retry.available_at == due
