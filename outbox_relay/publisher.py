"""Publishing outbox rows to RabbitMQ with publisher confirms."""

from __future__ import annotations


def events_exchange_name(prefix: str) -> str:
    """The durable topic exchange every outbox row is published to."""
    return f"{prefix}.events"
