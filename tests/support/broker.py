"""Removing the exchanges and queues a test or a benchmark run declared."""

from __future__ import annotations

import contextlib

import aio_pika

from consumer.topology import TopologyNames


async def delete_topology(amqp_url: str, prefix: str) -> None:
    """Delete the topology under ``prefix``; what does not exist is skipped."""
    names = TopologyNames.for_prefix(prefix)
    connection = await aio_pika.connect(amqp_url)
    try:
        for queue in names.queues:
            # A failed delete closes its channel, so each gets its own.
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                await channel.queue_delete(queue)
        for exchange in names.exchanges:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()
