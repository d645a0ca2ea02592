"""The statements that lock many tasks at once never deadlock one another.

The relay's mark-published (through the NEW-to-PENDING trigger) and the
consumer's batched claim and completion each lock a batch of task rows. Two
such statements over the same tasks must take the locks in the same order,
or they deadlock whenever they overlap; here they are made to overlap, many
times, on the real database.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from consumer import queries as consumer_queries
from outbox_relay import queries as relay_queries

pytestmark = pytest.mark.timeout(120)

TASKS_PER_ROUND = 1000
ROUNDS = 8


async def new_tasks(db: asyncpg.Connection[Any]) -> tuple[list[uuid.UUID], list[int]]:
    """Tasks in NEW with their task.created outbox rows, as the API writes them."""
    task_ids = [uuid.uuid4() for _ in range(TASKS_PER_ROUND)]
    await db.executemany(
        """
        INSERT INTO tasks (id, title, type, payload, priority, status, max_attempts)
        VALUES ($1, 't', 'sleep', '{"seconds": 0}', 'MEDIUM', 'NEW', 3)
        """,
        [(task_id,) for task_id in task_ids],
    )
    # Outbox ids ascend in the opposite order to the task ids, so a statement
    # that locked in outbox order would lock against the consumer's order.
    ordered = sorted(task_ids, reverse=True)
    rows = await db.fetch(
        """
        INSERT INTO outbox (routing_key, body, correlation_id)
        SELECT 'task.created', '{}', task_id
          FROM unnest($1::text[]) WITH ORDINALITY AS u(task_id, n)
         ORDER BY n
        RETURNING id
        """,
        [str(task_id) for task_id in ordered],
    )
    return task_ids, [row["id"] for row in rows]


async def test_marking_published_and_claiming_the_same_tasks_never_deadlock(
    db: asyncpg.Connection[Any], database_url: str
) -> None:
    relay = await asyncpg.connect(database_url)
    consumer = await asyncpg.connect(database_url)
    try:
        for _ in range(ROUNDS):
            task_ids, row_ids = await new_tasks(db)
            await asyncio.gather(
                relay.execute(relay_queries.MARK_PUBLISHED, row_ids),
                consumer.fetch(
                    consumer_queries.CLAIM_READY_TASKS,
                    task_ids,
                    [f"m-{task_id}" for task_id in task_ids],
                    [False] * len(task_ids),
                    ["sleep"],
                ),
            )
    finally:
        await relay.close()
        await consumer.close()

    statuses = await db.fetch("SELECT status, count(*) FROM tasks GROUP BY status")
    assert sum(row["count"] for row in statuses) == TASKS_PER_ROUND * ROUNDS
    assert {row["status"] for row in statuses} <= {"IN_PROGRESS"}


async def test_the_trigger_finds_a_batch_s_published_rows_by_hash(
    db: asyncpg.Connection[Any],
) -> None:
    # Transition tables have no statistics; nested loops over a batch's old
    # and new rows cost a comparison per pair, a million for 1,000 rows.
    task_ids, outbox_ids = await new_tasks(db)
    plans: list[str] = []
    db.add_log_listener(lambda _, message: plans.append(message.message))
    await db.execute("LOAD 'auto_explain'")
    await db.execute("SET auto_explain.log_min_duration = 0")
    await db.execute("SET auto_explain.log_nested_statements = on")
    await db.execute("SET client_min_messages = log")

    await db.execute(relay_queries.MARK_PUBLISHED, outbox_ids)
    await db.execute("RESET client_min_messages")

    (join,) = [plan for plan in plans if "FROM new_rows" in plan]
    assert "Hash Join" in join, join
    assert "Nested Loop" not in join, join
    pending = await db.fetchval(
        "SELECT count(*) FROM tasks WHERE id = ANY($1) AND status = 'PENDING'",
        task_ids,
    )
    assert pending == len(task_ids)
