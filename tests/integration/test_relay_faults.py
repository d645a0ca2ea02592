"""The relay and rows that cannot be published because of themselves.

An oversize row, or one the broker closes the channel over, must fail with
back-off and end up parked, without holding back the rows around it or
making the relay spin; a parked row can be replayed from the command line.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractConnection, AbstractQueue
from structlog.testing import capture_logs

from consumer.topology import TopologyNames
from outbox_relay.publisher import events_exchange_name
from tests.conftest import ROOT
from tests.integration.test_relay import (
    ROUTED,
    drain,
    eventually,
    insert_row,
    outbox_row,
    published,
    relay_settings,
    running_relay,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def routed_queue(amqp: AbstractConnection, amqp_prefix: str) -> AbstractQueue:
    """``{prefix}.tasks`` bound to the events exchange for every ``task.*`` key."""
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        events_exchange_name(amqp_prefix), aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        TopologyNames.for_prefix(amqp_prefix).tasks_queue, durable=True
    )
    await queue.bind(exchange, ROUTED)
    return queue


async def parked(db: asyncpg.Connection[Any], row_id: int) -> asyncpg.Record | None:
    row = await outbox_row(db, row_id)
    return row if row["dead_at"] is not None else None


async def test_an_oversize_row_is_failed_and_parked_while_others_flow(
    db: asyncpg.Connection[Any],
    database_url: str,
    amqp_prefix: str,
    routed_queue: AbstractQueue,
) -> None:
    settings = relay_settings(
        database_url,
        amqp_prefix,
        relay_max_message_bytes=1000,
        relay_max_attempts=3,
    )
    before = await insert_row(db)
    big = await insert_row(db, body={"text": "x" * 2000})
    after = await insert_row(db)

    async with running_relay(settings):
        dead = await eventually(lambda: parked(db, big), what="the oversize row parked")
        await eventually(lambda: published(db, before, after), what="the others")

    assert dead["attempts"] == 3
    assert dead["published_at"] is None
    assert "oversize" in dead["last_error"]
    assert "RELAY_MAX_MESSAGE_BYTES" in dead["last_error"]
    assert sorted(str(m.message_id) for m in await drain(routed_queue)) == sorted(
        [str(before), str(after)]
    )


def broker_max_message_size() -> int:
    out = subprocess.run(
        [
            "rabbitmqctl",
            "--quiet",
            "eval",
            "application:get_env(rabbit, max_message_size).",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    # Prints {ok,134217728}
    return int(out.strip().strip("{}").split(",")[1])


@pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host"
)
async def test_a_row_the_broker_closes_the_channel_over_is_found_and_parked(
    db: asyncpg.Connection[Any],
    database_url: str,
    amqp_prefix: str,
    routed_queue: AbstractQueue,
) -> None:
    limit = await asyncio.to_thread(broker_max_message_size)
    if limit > 256 * 1024 * 1024:
        pytest.skip(f"the broker takes messages of {limit} bytes")

    # The relay's own check is set above the broker's limit, so this row
    # reaches the broker, which closes the channel over it.
    settings = relay_settings(
        database_url,
        amqp_prefix,
        relay_max_message_bytes=2 * limit,
        relay_max_attempts=2,
        relay_publish_timeout=60.0,
        relay_lease_seconds=120.0,
    )
    small = [await insert_row(db) for _ in range(3)]
    huge: int = await db.fetchval(
        """
        INSERT INTO outbox (routing_key, body)
        VALUES ('task.created', jsonb_build_object('pad', repeat('x', $1)))
        RETURNING id
        """,
        limit + 1024,
    )
    small += [await insert_row(db) for _ in range(3)]

    with capture_logs() as logs:
        async with running_relay(settings) as running:
            await eventually(
                lambda: published(db, *small), within=60, what="the small rows"
            )
            dead = await eventually(
                lambda: parked(db, huge), within=90, what="the huge row parked"
            )
            assert not running.task.done()

    assert dead["attempts"] == 2
    assert "closed the channel" in dead["last_error"]
    assert "max size" in dead["last_error"]
    attempts = await db.fetch("SELECT attempts FROM outbox WHERE id = ANY($1)", small)
    assert [row["attempts"] for row in attempts] == [0] * len(small)
    failed = {e["id"] for e in logs if e["event"] == "outbox_publish_failed"}
    assert failed == {huge}, "only the row at fault is blamed"
    received = {str(m.message_id) for m in await drain(routed_queue)}
    assert received == {str(row_id) for row_id in small}


async def run_relay_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox_relay",
        *args,
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def park(db: asyncpg.Connection[Any], row_id: int) -> None:
    await db.execute(
        """
        UPDATE outbox
           SET dead_at = now(), attempts = 25, last_error = 'unroutable',
               available_at = now() + interval '1 hour'
         WHERE id = $1
        """,
        row_id,
    )


async def test_replay_dead_gives_parked_rows_a_fresh_start(
    db: asyncpg.Connection[Any],
    database_url: str,
    amqp_prefix: str,
    routed_queue: AbstractQueue,
) -> None:
    first, second, third = [await insert_row(db) for _ in range(3)]
    live = await insert_row(db, available_in=3600)
    for row_id in (first, second, third):
        await park(db, row_id)
    assert await db.fetchval("SELECT count(*) FROM outbox_dead") == 3

    code, out, err = await run_relay_cli(database_url, "replay-dead", str(first))
    assert code == 0, err
    assert f"replayed 1 row(s): {first}" in out
    row = await outbox_row(db, first)
    assert (row["dead_at"], row["attempts"], row["claimed_by"]) == (None, 0, None)
    assert row["last_error"] == "unroutable", "kept until a new failure"
    assert row["available_at"] <= await db.fetchval("SELECT now()")

    code, out, err = await run_relay_cli(
        database_url, "replay-dead", str(first), str(live)
    )
    assert code == 1
    assert f"{first}, {live}" in err, "neither is parked"

    code, out, err = await run_relay_cli(database_url, "replay-dead", "--all")
    assert code == 0, err
    assert f"replayed 2 row(s): {second}, {third}" in out
    assert await db.fetchval("SELECT count(*) FROM outbox_dead") == 0

    code, _, _ = await run_relay_cli(database_url, "replay-dead")
    assert code == 2, "neither ids nor --all is a usage error"

    async with running_relay(relay_settings(database_url, amqp_prefix)):
        await eventually(
            lambda: published(db, first, second, third), what="replayed rows"
        )
    assert (await outbox_row(db, live))["published_at"] is None
    assert len(await drain(routed_queue)) == 3
