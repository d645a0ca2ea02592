"""Names and declaration of every exchange and queue, all under AMQP_PREFIX.

```
{prefix}.events       topic exchange; routing key = event type
  ├─ task.created, task.retry ─▶ {prefix}.tasks        (the consumer's work)
  └─ task.completed, task.failed, task.cancelled
                               ─▶ {prefix}.task-events  (for subscribers; capped)
{prefix}.dead-letter  fanout exchange ─▶ {prefix}.dead-letter queue
```

Work and event queues are quorum queues, so a message survives a broker
restart and the broker counts deliveries: a message delivered more than
``delivery_limit`` times (a handler that kills its process every time) is
dead-lettered instead of looping forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from outbox_relay.publisher import events_exchange_name

WORK_ROUTING_KEYS = ("task.created", "task.retry")
EVENT_ROUTING_KEYS = ("task.completed", "task.failed", "task.cancelled")


@dataclass(frozen=True)
class TopologyNames:
    events_exchange: str
    tasks_queue: str
    task_events_queue: str
    dead_letter_exchange: str
    dead_letter_queue: str

    @classmethod
    def for_prefix(cls, prefix: str) -> TopologyNames:
        return cls(
            events_exchange=events_exchange_name(prefix),
            tasks_queue=f"{prefix}.tasks",
            task_events_queue=f"{prefix}.task-events",
            dead_letter_exchange=f"{prefix}.dead-letter",
            dead_letter_queue=f"{prefix}.dead-letter",
        )

    @property
    def queues(self) -> tuple[str, ...]:
        return (self.tasks_queue, self.task_events_queue, self.dead_letter_queue)

    @property
    def exchanges(self) -> tuple[str, ...]:
        return (self.events_exchange, self.dead_letter_exchange)


@dataclass(frozen=True)
class Topology:
    events: AbstractExchange
    tasks: AbstractQueue
    dead_letter: AbstractQueue


async def declare_topology(
    channel: AbstractChannel,
    names: TopologyNames,
    *,
    delivery_limit: int,
    task_events_max_length: int,
) -> Topology:
    """Declare everything idempotently; safe from several consumers at once."""
    events = await channel.declare_exchange(
        names.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead_letter_exchange = await channel.declare_exchange(
        names.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )

    dead_letter = await channel.declare_queue(
        names.dead_letter_queue,
        durable=True,
        arguments={"x-queue-type": "quorum"},
    )
    await dead_letter.bind(dead_letter_exchange)

    tasks = await channel.declare_queue(
        names.tasks_queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": names.dead_letter_exchange,
        },
    )
    for routing_key in WORK_ROUTING_KEYS:
        await tasks.bind(events, routing_key)

    # Lifecycle events exist for other services to subscribe to. Binding them
    # here keeps them routable (the relay treats unroutable as a failure); the
    # cap drops the oldest when nobody reads them.
    task_events = await channel.declare_queue(
        names.task_events_queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-max-length": task_events_max_length,
            "x-overflow": "drop-head",
        },
    )
    for routing_key in EVENT_ROUTING_KEYS:
        await task_events.bind(events, routing_key)

    return Topology(events=events, tasks=tasks, dead_letter=dead_letter)
