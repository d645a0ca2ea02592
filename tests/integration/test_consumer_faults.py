"""The consumer when things go wrong: database outages, stuck tasks, dead letters.

Same set-up as ``test_consumer``: real PostgreSQL and RabbitMQ, consumers run
in-process, task rows inserted directly. PostgreSQL faults go through a
:class:`TcpProxy` in front of the consumer's database connections; the test's
own connection goes around it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractConnection
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

from consumer.outage import DatabaseOutage
from consumer.sweeper import StuckTaskSweeper
from outbox_relay.config import sqlalchemy_url
from tests.conftest import AMQP_URL, ROOT
from tests.handlers import CRASH_TIMEOUT_SECONDS, LEDGER_TABLE_DDL
from tests.integration.test_consumer import REGISTRY, Harness, eventually
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def harness(
    database_url: str,
    amqp_prefix: str,
    db: asyncpg.Connection,
    amqp: AbstractConnection,
) -> AsyncIterator[Harness]:
    await db.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    harness = Harness(database_url, amqp_prefix, db, amqp)
    try:
        yield harness
    finally:
        await harness.stop_all()


@pytest.fixture
async def database_proxy() -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(5432)
    await proxy.open()
    try:
        yield proxy
    finally:
        await proxy.close()


def through(proxy: TcpProxy, database_url: str) -> str:
    return database_url.replace(":5432/", f":{proxy.port}/")


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[Any]:
    return [event for event in logs if event["event"] == name]


async def dead_letter_count(harness: Harness) -> int:
    channel = await harness.amqp.channel()
    try:
        queue = await channel.declare_queue(
            harness.names.dead_letter_queue, passive=True
        )
        return int(queue.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def test_an_outage_longer_than_the_delivery_limit_dead_letters_nothing(
    harness: Harness, database_proxy: TcpProxy
) -> None:
    # With a delivery limit of 2, requeueing on every database error used to
    # dead-letter a message after about two seconds of outage.
    await harness.start(
        database_url=through(database_proxy, harness.database_url),
        consumer_delivery_limit=2,
    )
    task_ids = [
        await harness.insert_task("checksum", {"text": str(i)}) for i in range(5)
    ]

    with capture_logs() as logs:
        await database_proxy.close()
        for task_id in task_ids:
            await harness.publish(task_id, "checksum")

        async def reported_down() -> bool:
            return bool(events(logs, "consumer_database_down"))

        await eventually(reported_down, "the outage to be noticed")
        # The outage has to outlast the old give-up point; nothing but time
        # can show that messages are held rather than requeued meanwhile.
        await asyncio.sleep(6)
        assert await dead_letter_count(harness) == 0
        await database_proxy.open()

        for task_id in task_ids:
            task = await harness.wait_status(task_id, "COMPLETED", within=30)
            assert task["attempts"] == 1

    assert await dead_letter_count(harness) == 0
    assert len(events(logs, "consumer_database_down")) == 1
    assert len(events(logs, "consumer_database_up")) == 1
    assert not events(logs, "message_requeued")


async def test_an_outage_during_the_handler_records_without_running_it_again(
    harness: Harness, database_proxy: TcpProxy
) -> None:
    await harness.db.execute(LEDGER_TABLE_DDL)
    await harness.start(database_url=through(database_proxy, harness.database_url))
    task_id = await harness.insert_task("ledger", {"amount": 5, "delay": 1.0})

    with capture_logs() as logs:
        await harness.publish(task_id, "ledger")
        await harness.wait_status(task_id, "IN_PROGRESS")
        await database_proxy.close()

        async def recording_failed() -> bool:
            return bool(events(logs, "consumer_database_down"))

        await eventually(recording_failed, "the outcome's transaction to fail")
        await database_proxy.open()
        task = await harness.wait_status(task_id, "COMPLETED", within=30)

    assert task["attempts"] == 1
    ledger = await harness.db.fetch("SELECT task_id, attempt FROM test_ledger")
    assert [(row["task_id"], row["attempt"]) for row in ledger] == [(task_id, 1)]
    assert len(await harness.outbox(task_id, "task.completed")) == 1


async def test_shutdown_during_an_outage_leaves_the_message_in_the_queue(
    harness: Harness, database_proxy: TcpProxy
) -> None:
    await harness.start(
        database_url=through(database_proxy, harness.database_url),
        consumer_delivery_limit=1,
    )
    task_id = await harness.insert_task("checksum", {"text": "later"})

    with capture_logs() as logs:
        await database_proxy.close()
        await harness.publish(task_id, "checksum")

        async def held() -> bool:
            return bool(events(logs, "consumer_database_down"))

        await eventually(held, "the delivery to meet the outage")
        await harness.stop()
    assert events(logs, "message_left_for_redelivery")

    await database_proxy.open()
    await harness.start(consumer_delivery_limit=1)
    task = await harness.wait_status(task_id, "COMPLETED")
    assert task["attempts"] == 1
    assert await dead_letter_count(harness) == 0


async def test_a_redelivery_after_an_interrupted_last_attempt_fails_the_task(
    harness: Harness,
) -> None:
    # As a consumer that died during attempt 3 of 3 leaves it.
    task_id = await harness.insert_task(
        "checksum", {"text": "x"}, status="IN_PROGRESS", attempts=3, max_attempts=3
    )
    message_id = await harness.publish_abandoned(task_id, "checksum")

    await harness.start()
    task = await harness.wait_status(task_id, "FAILED")

    assert task["attempts"] == 3
    assert "attempt 3 of 3 was interrupted" in task["error"]
    assert task["result"] is None
    [event] = await harness.outbox(task_id)
    assert event["routing_key"] == "task.failed"
    assert event["body"]["attempts"] == 3
    assert await harness.inbox_count(message_id) == 1


async def test_a_redelivery_after_an_interrupted_attempt_runs_the_task_again(
    harness: Harness,
) -> None:
    # As a consumer that died during attempt 1 of 3 leaves it.
    task_id = await harness.insert_task(
        "checksum", {"text": "x"}, status="IN_PROGRESS", attempts=1, max_attempts=3
    )
    message_id = await harness.publish_abandoned(task_id, "checksum")

    await harness.start()
    task = await harness.wait_status(task_id, "COMPLETED")

    assert task["attempts"] == 2
    assert await harness.inbox_count(message_id) == 1


@pytest.mark.parametrize("max_attempts", [1, 3])
async def test_a_second_copy_of_a_running_message_is_dropped_unrun(
    harness: Harness, max_attempts: int
) -> None:
    # A relay that dies after the broker confirmed a batch and before marking
    # it publishes the batch again: the same message id, fresh to the broker,
    # delivered while the first copy's attempt runs.
    await harness.start()
    task_id = await harness.insert_task(
        "sleep", {"seconds": 1}, max_attempts=max_attempts
    )
    message_id = await harness.publish(task_id, "sleep")
    await harness.wait_status(task_id, "IN_PROGRESS")

    with capture_logs() as logs:
        await harness.publish(task_id, "sleep", message_id=message_id)
        task = await harness.wait_status(task_id, "COMPLETED")
        await harness.sentinel()

    assert (task["attempts"], task["error"]) == (1, None)
    assert [e["routing_key"] for e in await harness.outbox(task_id)] == [
        "task.completed"
    ]
    assert await harness.inbox_count(message_id) == 1
    copies = [e for e in logs if e["event"] == "message_duplicate"]
    assert [e.get("in_flight") for e in copies] == [True]


async def test_a_handler_without_its_own_timeout_stops_at_the_time_limit(
    harness: Harness,
) -> None:
    await harness.start(task_time_limit_seconds=0.3)
    task_id = await harness.insert_task("sleep", {"seconds": 60}, max_attempts=1)

    await harness.publish(task_id, "sleep")
    task = await harness.wait_status(task_id, "FAILED")

    assert task["error"].startswith("HandlerTimeoutError")


async def insert_stuck(
    harness: Harness,
    task_type: str,
    *,
    started_ago: float,
    attempts: int = 1,
    max_attempts: int = 3,
) -> uuid.UUID:
    task_id = await harness.insert_task(
        task_type,
        {},
        status="IN_PROGRESS",
        attempts=attempts,
        max_attempts=max_attempts,
    )
    await harness.db.execute(
        "UPDATE tasks SET started_at = now() - make_interval(secs => $2) WHERE id = $1",
        task_id,
        started_ago,
    )
    return task_id


@pytest.fixture
async def sweeper(harness: Harness) -> AsyncIterator[StuckTaskSweeper]:
    engine = create_async_engine(sqlalchemy_url(harness.database_url))
    try:
        yield StuckTaskSweeper(
            engine,
            REGISTRY,
            DatabaseOutage(asyncio.Event()),
            default_limit=3600,
            grace=1,
            interval=60,
        )
    finally:
        await engine.dispose()


async def test_one_sweep_retries_or_fails_each_stuck_task(
    harness: Harness, sweeper: StuckTaskSweeper
) -> None:
    retried = await insert_stuck(harness, "always_fail", started_ago=7200)
    exhausted = await insert_stuck(
        harness, "always_fail", started_ago=7200, attempts=3, max_attempts=3
    )
    # The crash type's own timeout is its limit, not the default hour.
    crashed = await insert_stuck(
        harness, "crash", started_ago=CRASH_TIMEOUT_SECONDS + 5
    )
    running = await insert_stuck(harness, "always_fail", started_ago=60)
    fresh_crash = await insert_stuck(harness, "crash", started_ago=0)
    waiting = await harness.insert_task("always_fail", {})

    swept = await sweeper.sweep()

    assert {(task.id, task.status) for task in swept} == {
        (str(retried), "PENDING"),
        (str(exhausted), "FAILED"),
        (str(crashed), "PENDING"),
    }
    for task_id in (retried, crashed):
        task = await harness.task(task_id)
        assert task["status"] == "PENDING"
        assert "exceeded its time limit" in task["error"]
        [retry] = await harness.outbox(task_id)
        assert retry["routing_key"] == "task.retry"
        assert retry["body"] == {"task_id": str(task_id), "type": task["type"]}

    failed = await harness.task(exhausted)
    assert failed["completed_at"] is not None
    [event] = await harness.outbox(exhausted)
    assert (event["routing_key"], event["body"]) == (
        "task.failed",
        {
            "task_id": str(exhausted),
            "type": "always_fail",
            "status": "FAILED",
            "attempts": 3,
        },
    )
    for task_id in (running, fresh_crash, waiting):
        assert await harness.outbox(task_id) == []
    assert (await harness.task(running))["status"] == "IN_PROGRESS"
    assert await sweeper.sweep() == []


async def test_a_sweep_skips_tasks_locked_by_someone_else(
    harness: Harness, sweeper: StuckTaskSweeper, database_url: str
) -> None:
    task_id = await insert_stuck(harness, "always_fail", started_ago=7200)
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", task_id)
            # Must not wait for the lock: another sweep or a delivery has it.
            assert await asyncio.wait_for(sweeper.sweep(), timeout=5) == []
    finally:
        await other.close()

    assert [task.id for task in await sweeper.sweep()] == [str(task_id)]


async def test_the_consumer_sweeps_on_its_own_and_the_retry_finishes_the_task(
    harness: Harness,
) -> None:
    await harness.start(
        task_sweep_interval_seconds=0.2, task_time_limit_grace_seconds=0.0
    )
    task_id = await insert_stuck(
        harness, "crash", started_ago=CRASH_TIMEOUT_SECONDS + 1, attempts=1
    )

    async def retry_row() -> list[asyncpg.Record]:
        return await harness.outbox(task_id, "task.retry")

    [row] = await eventually(retry_row, "the sweeper to retry the task")
    assert (await harness.task(task_id))["status"] == "PENDING"
    # Run the retry as a checksum: the row, not the message, names the type.
    await harness.db.execute(
        "UPDATE tasks SET type = 'checksum' WHERE id = $1", task_id
    )
    await harness.relay_due(row)
    task = await harness.wait_status(task_id, "COMPLETED")
    assert task["attempts"] == 2


async def run_cli(harness: Harness, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        *args,
        cwd=ROOT,
        env={**os.environ, "AMQP_URL": AMQP_URL, "AMQP_PREFIX": harness.prefix},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_dead_letters_carry_their_reason_and_replay_where_they_came_from(
    harness: Harness,
) -> None:
    await harness.start()
    missing = uuid.uuid4()
    headers = {"x-request-id": "req-dead"}
    message_id = await harness.publish(missing, "checksum", headers=headers)
    await harness.publish_body(b"{not json", message_id="garbage")

    async def dead_lettered() -> bool:
        return await dead_letter_count(harness) == 2

    await eventually(dead_lettered, "two dead letters")

    code, out, err = await run_cli(harness, "dead-letters", "list", "--json")
    assert code == 0, err
    letters = {letter["message_id"]: letter for letter in json.loads(out)}
    assert set(letters) == {message_id, "garbage"}
    assert letters[message_id]["reason"] == "task not found"
    assert letters[message_id]["dead_lettered_by"] == "consumer"
    assert letters[message_id]["routing_key"] == "task.created"
    assert letters[message_id]["correlation_id"] == str(missing)
    assert letters["garbage"]["reason"] == "body is not JSON"
    code, table, err = await run_cli(harness, "dead-letters", "list")
    assert code == 0, err
    assert "task not found" in table and "2 dead letter(s)" in table
    assert await dead_letter_count(harness) == 2, "listing must not consume"

    # The cause is fixed: the task now exists. Replaying one message leaves
    # the other where it is.
    await harness.db.execute(
        """
        INSERT INTO tasks (id, title, type, payload, priority, status, max_attempts)
        VALUES ($1, 'late', 'checksum', '{"text": "late"}', 'MEDIUM', 'PENDING', 3)
        """,
        missing,
    )
    code, out, err = await run_cli(harness, "dead-letters", "replay", message_id)
    assert code == 0, err
    assert message_id in out

    task = await harness.wait_status(missing, "COMPLETED")
    assert task["attempts"] == 1
    [event] = await harness.outbox(missing, "task.completed")
    # The replay kept the original headers: the request id comes through (the
    # message had no trace, so the consumer started one).
    assert event["headers"]["x-request-id"] == headers["x-request-id"]
    assert set(event["headers"]) == {"x-request-id", "traceparent"}
    assert await dead_letter_count(harness) == 1

    code, _, err = await run_cli(harness, "dead-letters", "replay", "no-such-id")
    assert code == 1
    assert "no-such-id" in err
    code, _, _ = await run_cli(harness, "dead-letters", "replay")
    assert code == 2, "neither ids nor --all is a usage error"
    code, out, err = await run_cli(harness, "dead-letters", "replay", "--all")
    assert code == 0, err
    # The running consumer dead-letters the garbage again at once; that copy
    # joins the tail of the queue and must not be replayed in the same run.
    assert "replayed 1 message(s): garbage" in out
