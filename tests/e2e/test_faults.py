"""Processes killed, crash-looping or stopped, with the real api, relay and consumer."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from tests.e2e.test_pipeline import all_terminal, submit
from tests.handlers import LEDGER_TABLE_DDL
from tests.support.faults import restart_if_exited, run_module
from tests.support.processes import ProcessGroup
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


async def status_of(db: asyncpg.Connection, task_id: str) -> str:
    status: str = await db.fetchval(
        "SELECT status FROM tasks WHERE id = $1", uuid.UUID(task_id)
    )
    return status


async def test_a_consumer_killed_mid_task_is_finished_by_the_redelivery(
    processes: ProcessGroup, db: asyncpg.Connection
) -> None:
    await db.execute(LEDGER_TABLE_DDL)
    for name in ("api", "relay", "consumer"):
        processes.start(name)
    await processes.wait_ready()

    async with processes.api_client() as client:
        task = await submit(
            client,
            {"title": "killed", "type": "ledger", "payload": {"amount": 3, "delay": 3}},
        )

        async def running() -> bool:
            return await status_of(db, task["id"]) == "IN_PROGRESS"

        await eventually(running, 30, "the task to start")
        processes.kill("consumer")
        processes.start("consumer")

        await eventually(lambda: all_terminal(db, 1), 60, "the task to finish")
        final = (await client.get(f"/api/v1/tasks/{task['id']}")).json()

    assert final["status"] == "COMPLETED"
    assert final["attempts"] == 2, "the killed attempt counts"
    assert final["result"] == {"amount": 3}
    ledger = await db.fetch("SELECT task_id, attempt FROM test_ledger")
    assert [(str(row["task_id"]), row["attempt"]) for row in ledger] == [
        (task["id"], 2)
    ]
    completed = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'task.completed'"
    )
    assert completed == 1


async def test_a_handler_that_kills_its_consumer_ends_dead_lettered_and_failed(
    processes: ProcessGroup, db: asyncpg.Connection
) -> None:
    consumer_env = {
        "CONSUMER_DELIVERY_LIMIT": "2",
        # One message at a time, so the crash loop cannot take a neighbour
        # down with it.
        "CONSUMER_PREFETCH": "1",
        "TASK_TIME_LIMIT_GRACE_SECONDS": "1",
        "TASK_SWEEP_INTERVAL_SECONDS": "0.5",
    }
    processes.start("api")
    processes.start("relay")
    processes.start("consumer", **consumer_env)
    await processes.wait_ready()

    crashes = 0

    def supervised(
        check: Callable[[], Awaitable[bool]],
    ) -> Callable[[], Awaitable[bool]]:
        """``check``, restarting the consumer whenever it died meanwhile."""

        async def step() -> bool:
            nonlocal crashes
            if restart_if_exited(processes, "consumer", **consumer_env) is not None:
                crashes += 1
            return await check()

        return step

    async with processes.api_client() as client:
        # More attempts than the delivery limit allows deliveries: the broker
        # dead-letters the message first, with three attempts spent.
        doomed = await submit(
            client, {"title": "crash", "type": "crash", "max_attempts": 4}
        )
        other = await submit(client, {"title": "still served"})

        async def other_done() -> bool:
            return await status_of(db, other["id"]) == "COMPLETED"

        await eventually(supervised(other_done), 90, "the other task")

        async def doomed_failed() -> bool:
            return await status_of(db, doomed["id"]) == "FAILED"

        await eventually(supervised(doomed_failed), 90, "the crash task")
        final = (await client.get(f"/api/v1/tasks/{doomed['id']}")).json()

    # Three deliveries of the first message, then the sweeper's retry ran
    # attempt 4, whose redelivery found no attempts left.
    assert crashes == 4, processes.log_text()
    assert final["attempts"] == 4
    assert "attempt 4 of 4 was interrupted" in final["error"]

    listed = await run_module(processes, "consumer", "dead-letters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [letter] = json.loads(listed.stdout)
    assert letter["correlation_id"] == doomed["id"]
    assert letter["routing_key"] == "task.created"
    assert (letter["reason"], letter["dead_lettered_by"]) == (
        "delivery_limit",
        "broker",
    )
    failed_events = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'task.failed'"
        " AND correlation_id = $1",
        doomed["id"],
    )
    assert failed_events == 1


async def test_sigterm_leaves_nothing_claimed_or_locked(
    processes: ProcessGroup, db: asyncpg.Connection
) -> None:
    grace = {"CONSUMER_SHUTDOWN_GRACE_SECONDS": "0.5"}
    processes.start("api")
    processes.start("relay")
    processes.start("consumer", **grace)
    processes.start("consumer-2", **grace)
    await processes.wait_ready()

    async with processes.api_client() as client:
        long = [
            await submit(
                client,
                {"title": f"long {i}", "type": "sleep", "payload": {"seconds": 60}},
            )
            for i in range(4)
        ]
        short = [await submit(client, {"title": f"short {i}"}) for i in range(20)]

    async def long_running() -> bool:
        running = await db.fetchval(
            "SELECT count(*) FROM tasks WHERE status = 'IN_PROGRESS'"
        )
        return bool(running == len(long))

    await eventually(long_running, 60, "the long tasks to start")
    codes = processes.stop_all()
    assert all(code == 0 for code in codes.values()), (codes, processes.log_text())

    # Attempts cut short were handed back, not left for a lease to expire.
    rows = await db.fetch("SELECT status, attempts FROM tasks WHERE type = 'sleep'")
    assert [(row["status"], row["attempts"]) for row in rows] == [("PENDING", 0)] * 4
    claimed = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE claimed_by IS NOT NULL"
    )
    assert claimed == 0

    async def nothing_held() -> bool:
        # A backend may outlive its client's exit by a moment.
        left = await db.fetchval(
            """
            SELECT (SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database()
                       AND pid <> pg_backend_pid())
                 + (SELECT count(*) FROM pg_locks
                     WHERE database = (SELECT oid FROM pg_database
                                        WHERE datname = current_database())
                       AND pid <> pg_backend_pid())
            """
        )
        return bool(left == 0)

    await eventually(nothing_held, 10, "no connection or lock left behind")

    # Everything resumes where it stopped.
    await db.execute(
        """UPDATE tasks SET payload = '{"seconds": 0}' WHERE type = 'sleep'"""
    )
    for name in ("api", "relay", "consumer"):
        processes.start(name)
    await processes.wait_ready()
    total = len(long) + len(short)
    await eventually(lambda: all_terminal(db, total), 60, "every task to finish")
    statuses = await db.fetch("SELECT status, attempts FROM tasks")
    assert {(row["status"], row["attempts"]) for row in statuses} == {("COMPLETED", 1)}


async def test_listing_dead_letters_before_any_consumer_ran_is_a_clear_error(
    processes: ProcessGroup,
) -> None:
    # Before any consumer declared the topology there is nothing to list.
    listed = await run_module(processes, "consumer", "dead-letters", "list")
    assert listed.returncode == 1
    assert "dead-letter" in listed.stderr
