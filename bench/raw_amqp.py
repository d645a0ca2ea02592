"""Raw aio-pika baselines: confirmed publishing and consuming with an inbox.

These are what the relay and the consumer would be with nothing but the
libraries: no leases, no retries, no metrics, no logging. They publish to and
consume from the project's own topology (declared by
``consumer.topology.declare_topology``) so both sides pay for the same quorum
queues.

``python -m bench.raw_amqp consume`` runs the raw chain's consumer as its own
process: for each message, one transaction inserts the inbox row and marks the
task ``COMPLETED``, then the message is acked.
"""

from __future__ import annotations

import asyncio
import json
import time

import aio_pika
import asyncpg
import click
import uvloop

from consumer.settings import DEFAULT_PREFETCH
from consumer.topology import TopologyNames, declare_topology

#: Unconfirmed messages the raw publisher keeps in flight.
PUBLISH_WINDOW = 256
#: The consumer's default prefetch, used by the raw consumers too.
PREFETCH = DEFAULT_PREFETCH

INSERT_INBOX = "INSERT INTO raw_inbox (message_id, routing_key) VALUES ($1, $2)"
COMPLETE_TASK = """
    UPDATE raw_tasks SET status = 'COMPLETED', completed_at = now(),
           updated_at = now()
     WHERE id = $1
"""


async def declare(amqp_url: str, prefix: str) -> None:
    """Declare the project's topology under ``prefix``, as the consumer does."""
    connection = await aio_pika.connect(amqp_url)
    try:
        await declare_topology(
            await connection.channel(),
            TopologyNames.for_prefix(prefix),
            delivery_limit=5,
            task_events_max_length=100_000,
        )
    finally:
        await connection.close()


async def publish(amqp_url: str, prefix: str, bodies: list[bytes]) -> float:
    """Publish ``bodies`` as persistent ``task.created`` messages with at most
    ``PUBLISH_WINDOW`` unconfirmed; returns messages per second."""
    await declare(amqp_url, prefix)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(
            TopologyNames.for_prefix(prefix).events_exchange
        )
        window = asyncio.Semaphore(PUBLISH_WINDOW)

        async def publish_one(index: int, body: bytes) -> None:
            try:
                await exchange.publish(
                    aio_pika.Message(
                        body,
                        message_id=str(index),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key="task.created",
                    mandatory=True,
                )
            finally:
                window.release()

        started = time.perf_counter()
        pending = []
        for index, body in enumerate(bodies):
            await window.acquire()
            pending.append(asyncio.create_task(publish_one(index, body)))
        await asyncio.gather(*pending)
        return len(bodies) / (time.perf_counter() - started)
    finally:
        await connection.close()


async def consume(
    amqp_url: str, database_url: str, prefix: str, count: int, *, complete: bool
) -> float:
    """Consume ``count`` messages from the tasks queue: per message one
    transaction inserting the inbox row (and, with ``complete``, marking the
    task done), then the ack. Returns messages per second from the first
    delivery to the last ack."""
    pool = await asyncpg.create_pool(database_url, min_size=4, max_size=PREFETCH)
    connection = await aio_pika.connect(amqp_url)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    handled = 0
    first: float | None = None

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal handled, first
        if first is None:
            first = time.perf_counter()
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    INSERT_INBOX, message.message_id, message.routing_key
                )
                if complete:
                    task_id = json.loads(message.body)["task_id"]
                    await conn.execute(COMPLETE_TASK, task_id)
            await message.ack()
        except Exception as exc:
            # A baseline that loses a message would measure nothing.
            if not done.done():
                done.set_exception(exc)
            raise
        handled += 1
        if handled >= count and not done.done():
            done.set_result(None)

    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(TopologyNames.for_prefix(prefix).tasks_queue)
        await queue.consume(on_message)
        await done
        assert first is not None
        return count / (time.perf_counter() - first)
    finally:
        await connection.close()
        await pool.close()


@click.group()
def main() -> None:
    """Raw AMQP baselines."""


@main.command("consume")
@click.option("--amqp-url", required=True)
@click.option("--database-url", required=True)
@click.option("--prefix", required=True)
def consume_forever(amqp_url: str, database_url: str, prefix: str) -> None:
    """The raw chain's consumer: runs until killed."""
    uvloop.run(consume(amqp_url, database_url, prefix, count=2**62, complete=True))


if __name__ == "__main__":
    main()
