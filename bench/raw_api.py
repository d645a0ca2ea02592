"""The bare endpoint the API is measured against, served like the real one.

``POST /tasks`` decodes the same body, then, with raw asyncpg and nothing
else (no ORM, no auth, no rate limit, no logging, no tracing):

- ``outbox`` mode: inserts the task row and its outbox row in one transaction
  (``raw_tasks``, ``raw_outbox``: the project's tables without triggers);
- ``chain`` mode: inserts the task row, commits, then publishes the message to
  RabbitMQ and waits for the broker's confirm: the "publish after commit" a
  team writes without an outbox (which loses the message if the process dies
  between commit and confirm). It is the front of the raw chain.

Run as ``python -m bench.raw_api --mode outbox|chain --port N --database-url
URL [--amqp-url URL --prefix P]``; uvicorn runs it with the same options as
``python -m service``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import asyncpg
import click
import msgspec
import uvicorn
from litestar import Litestar, post
from litestar.datastructures import State

INSERT_TASK = """
    INSERT INTO raw_tasks (id, title, type, payload, priority, status, max_attempts)
    VALUES ($1, $2, 'checksum', $3, 'MEDIUM', $4, 3)
"""
INSERT_OUTBOX = """
    INSERT INTO raw_outbox (routing_key, body, correlation_id)
    VALUES ('task.created', $1, $2)
"""


class RawTask(msgspec.Struct):
    title: str
    payload: dict[str, Any] = {}


def create_app(mode: str, database_url: str, amqp_url: str, prefix: str) -> Litestar:
    @asynccontextmanager
    async def resources(app: Litestar) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(database_url, min_size=10, max_size=10)
        app.state.pool = pool
        connection = None
        if mode == "chain":
            connection = await aio_pika.connect(amqp_url)
            channel = await connection.channel(publisher_confirms=True)
            app.state.exchange = await channel.get_exchange(f"{prefix}.events")
        try:
            yield
        finally:
            if connection is not None:
                await connection.close()
            await pool.close()

    @post("/tasks")
    async def submit(data: RawTask, state: State) -> dict[str, str]:
        task_id = uuid.uuid4()
        payload = json.dumps(data.payload)
        async with state.pool.acquire() as conn, conn.transaction():
            await conn.execute(INSERT_TASK, task_id, data.title, payload, "NEW")
            if mode == "outbox":
                body = json.dumps({"task_id": str(task_id), "type": "checksum"})
                await conn.execute(INSERT_OUTBOX, body, str(task_id))
        if mode == "chain":
            await state.exchange.publish(
                aio_pika.Message(
                    json.dumps({"task_id": str(task_id)}).encode(),
                    message_id=str(task_id),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="task.created",
            )
        return {"id": str(task_id)}

    return Litestar([submit], lifespan=[resources])


@click.command()
@click.option("--mode", type=click.Choice(["outbox", "chain"]), required=True)
@click.option("--port", type=int, required=True)
@click.option("--database-url", required=True)
@click.option("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
@click.option("--prefix", default="")
def main(mode: str, port: int, database_url: str, amqp_url: str, prefix: str) -> None:
    app = create_app(mode, database_url, amqp_url, prefix)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
