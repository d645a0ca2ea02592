"""The message contract: what a work message carries and what the consumer writes.

A work message (``task.created`` or ``task.retry``) only points at a task:
``{"task_id": ..., "type": ...}``. The ``tasks`` row is the source of truth for
payload, status and attempts, so a stale or repeated message can never carry
outdated data into a run. The AMQP ``message_id`` (the outbox row's id) is the
deduplication key of the inbox.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from consumer.errors import UnprocessableMessageError
from outbox_relay.outbox import OutboxMessage

TASK_RETRY = "task.retry"
TASK_COMPLETED = "task.completed"
TASK_FAILED = "task.failed"

#: Headers copied from a work message onto every message it causes, so a trace
#: and a request id follow a task through retries and lifecycle events.
PROPAGATED_HEADERS = ("traceparent", "tracestate", "x-request-id")

#: Header in which quorum queues count earlier deliveries of a message.
DELIVERY_COUNT_HEADER = "x-delivery-count"


class TaskMessage(msgspec.Struct, frozen=True):
    """Body of a work message."""

    task_id: uuid.UUID
    type: str


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """One delivery of a work message, independent of the AMQP client."""

    message_id: str | None
    routing_key: str
    body: bytes
    headers: Mapping[str, object] = field(default_factory=dict)
    #: Whether the broker delivered this message before, to a consumer that
    #: never settled it (it died, or its connection did). A copy the relay
    #: published again is new to the broker, so this is false for it.
    redelivered: bool = False

    @property
    def delivery_count(self) -> int:
        """Earlier deliveries of this message, as counted by the broker."""
        count = self.headers.get(DELIVERY_COUNT_HEADER)
        return count if isinstance(count, int) and count >= 0 else 0

    @property
    def request_id(self) -> str | None:
        return _header_text(self.headers.get("x-request-id"))

    def propagated_headers(self) -> dict[str, str]:
        """The headers to copy onto follow-up messages."""
        copied = {}
        for name in PROPAGATED_HEADERS:
            value = _header_text(self.headers.get(name))
            if value is not None:
                copied[name] = value
        return copied


_decoder = msgspec.json.Decoder(TaskMessage)


def decode_task_message(delivery: Delivery) -> TaskMessage:
    """Parse the body, or raise :class:`UnprocessableMessageError`.

    The reason names what is wrong, never the body's content.
    """
    if not delivery.message_id:
        raise UnprocessableMessageError(
            "message has no message_id", kind="no_message_id"
        )

    try:
        return _decoder.decode(delivery.body)
    except msgspec.ValidationError as exc:
        raise UnprocessableMessageError(
            f"invalid body: {exc}", kind="invalid_body"
        ) from exc
    except msgspec.DecodeError as exc:
        raise UnprocessableMessageError("body is not JSON", kind="not_json") from exc


def lifecycle_event(
    routing_key: str,
    *,
    task_id: uuid.UUID,
    task_type: str,
    status: str,
    attempts: int,
    headers: Mapping[str, str],
) -> OutboxMessage:
    """A ``task.completed`` or ``task.failed`` event for subscribers."""
    return OutboxMessage(
        routing_key=routing_key,
        body={
            "task_id": str(task_id),
            "type": task_type,
            "status": status,
            "attempts": attempts,
        },
        correlation_id=str(task_id),
        headers=headers,
    )


def retry_message(
    *,
    task_id: uuid.UUID,
    task_type: str,
    available_at: datetime,
    headers: Mapping[str, str],
) -> OutboxMessage:
    """The work message of the next attempt, published not before ``available_at``."""
    return OutboxMessage(
        routing_key=TASK_RETRY,
        body={"task_id": str(task_id), "type": task_type},
        correlation_id=str(task_id),
        headers=headers,
        available_at=available_at,
    )


def _header_text(value: object) -> str | None:
    # The AMQP table codec returns long strings as bytes or str depending on
    # the publisher; both mean the same text here.
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    return None
