"""The whole pipeline with the real api, relay and consumer processes."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from service.handlers import checksum_of
from tests.conftest import AMQP_URL
from tests.support.processes import ProcessGroup
from tests.support.proxy import TcpProxy, free_port
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


async def all_terminal(db: asyncpg.Connection, expected: int) -> bool:
    done = await db.fetchval(
        "SELECT count(*) FROM tasks WHERE status = ANY($1::text[])", list(TERMINAL)
    )
    return bool(done == expected)


async def submit(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/api/v1/tasks", json=body)
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    return task


def random_task(rng: random.Random, i: int) -> dict[str, Any]:
    priority = rng.choice(["LOW", "MEDIUM", "HIGH"])
    if i % 5 == 0:
        return {
            "title": f"sleep {i}",
            "type": "sleep",
            "payload": {"seconds": 0.01},
            "priority": priority,
        }
    if i % 7 == 0:
        return {"title": f"default {i}", "priority": priority}
    return {
        "title": f"hash {i}",
        "type": "checksum",
        "payload": {"text": f"text-{i}-{rng.random()}", "rounds": rng.randint(1, 5)},
        "priority": priority,
    }


def expected_result(body: dict[str, Any]) -> Any:
    if body.get("type") == "sleep":
        return {"slept_seconds": body["payload"]["seconds"]}
    payload = body.get("payload", {})
    return checksum_of(payload.get("text", ""), payload.get("rounds", 1))


async def test_300_tasks_complete_once_each(
    processes: ProcessGroup, db: asyncpg.Connection
) -> None:
    for name in ("api", "consumer", "relay"):
        processes.start(name)
    await processes.wait_ready()

    rng = random.Random(2)
    bodies = [random_task(rng, i) for i in range(300)]
    async with processes.api_client() as client:
        semaphore = asyncio.Semaphore(16)

        async def one(body: dict[str, Any]) -> dict[str, Any]:
            async with semaphore:
                return await submit(client, body)

        created = await asyncio.gather(*(one(body) for body in bodies))

        await eventually(lambda: all_terminal(db, 300), 120, "300 terminal tasks")

        for body, task in zip(bodies, created, strict=True):
            final = (await client.get(f"/api/v1/tasks/{task['id']}")).json()
            assert final["status"] == "COMPLETED", final
            assert final["result"] == expected_result(body)
            assert final["attempts"] == 1

    completions = await db.fetch(
        "SELECT correlation_id, count(*) AS n FROM outbox"
        " WHERE routing_key = 'task.completed' GROUP BY correlation_id"
    )
    assert len(completions) == 300
    assert all(row["n"] == 1 for row in completions)
    assert {row["correlation_id"] for row in completions} == {t["id"] for t in created}
    unpublished = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'task.created'"
        " AND published_at IS NULL"
    )
    assert unpublished == 0


async def test_api_accepts_while_broker_is_unreachable(
    processes: ProcessGroup, db: asyncpg.Connection
) -> None:
    broker_port = int(AMQP_URL.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(broker_port)
    try:
        processes.start("api")
        processes.start("consumer")
        # The relay reaches RabbitMQ only through the proxy, which is closed.
        processes.start("relay", AMQP_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
        await processes.wait_ready()

        async with processes.api_client() as client:
            for i in range(20):
                await submit(client, {"title": f"t{i}", "payload": {"text": str(i)}})
        await asyncio.sleep(2)
        statuses = await db.fetch("SELECT DISTINCT status FROM tasks")
        assert [row["status"] for row in statuses] == ["NEW"]
        published = await db.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL"
        )
        assert published == 0

        await proxy.open()
        await eventually(lambda: all_terminal(db, 20), 90, "tasks after broker return")
        statuses = await db.fetch("SELECT DISTINCT status FROM tasks")
        assert [row["status"] for row in statuses] == ["COMPLETED"]
    finally:
        await proxy.close()


async def test_a_message_delivered_twice_changes_nothing_the_second_time(
    processes: ProcessGroup, db: asyncpg.Connection, amqp_prefix: str
) -> None:
    for name in ("api", "consumer", "relay"):
        processes.start(name)
    await processes.wait_ready()
    async with processes.api_client() as client:
        task = await submit(client, {"title": "once", "payload": {"text": "x"}})
    await eventually(lambda: all_terminal(db, 1), 60, "the task to complete")
    before = await db.fetchrow("SELECT * FROM tasks")
    row = await db.fetchrow(
        "SELECT id, body::text AS body FROM outbox WHERE routing_key = 'task.created'"
    )
    assert row is not None and before is not None

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(f"{amqp_prefix}.events")
        await exchange.publish(
            aio_pika.Message(
                row["body"].encode(),
                message_id=str(row["id"]),
                correlation_id=task["id"],
                content_type="application/json",
                type="task.created",
            ),
            routing_key="task.created",
        )

    async def duplicate_seen() -> bool:
        return any(
            e.get("event") == "message_duplicate"
            and str(e.get("message_id")) == str(row["id"])
            for e in processes.log_events("consumer")
        )

    await eventually(duplicate_seen, 30, "the consumer to skip the duplicate")
    after = await db.fetchrow("SELECT * FROM tasks")
    assert dict(after) == dict(before)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM outbox WHERE routing_key = 'task.completed'"
        )
        == 1
    )


async def test_unroutable_rows_are_not_marked_published(
    processes: ProcessGroup, db: asyncpg.Connection
) -> None:
    # Without a consumer nobody has declared the work queue, so the broker
    # returns the message: the relay must keep the row and try again.
    processes.start("api")
    processes.start("relay", RELAY_RETRY_BASE_SECONDS="0.2")
    await processes.wait_ready()
    async with processes.api_client() as client:
        await submit(client, {"title": "nobody listens"})

    async def retried() -> bool:
        return bool(
            await db.fetchval("SELECT attempts FROM outbox WHERE published_at IS NULL")
        )

    await eventually(retried, 30, "a failed publish attempt")
    row = await db.fetchrow("SELECT * FROM outbox")
    assert row is not None
    assert row["published_at"] is None and row["last_error"]
    assert await db.fetchval("SELECT status FROM tasks") == "NEW"

    # Once the consumer declares its queue the same row goes through.
    processes.start("consumer")
    await eventually(lambda: all_terminal(db, 1), 60, "the task to complete")
    assert await db.fetchval("SELECT status FROM tasks") == "COMPLETED"


async def test_a_cancelled_pending_task_never_runs(
    processes: ProcessGroup, db: asyncpg.Connection
) -> None:
    for name in ("api", "consumer", "relay"):
        processes.start(name)
    await processes.wait_ready()
    async with processes.api_client() as client:
        first = await submit(client, {"title": "warm-up"})
        await eventually(lambda: all_terminal(db, 1), 60, "the warm-up task")
        assert processes.stop("consumer") == 0

        task = await submit(client, {"title": "to cancel"})

        async def pending() -> bool:
            status = await db.fetchval(
                "SELECT status FROM tasks WHERE id = $1", uuid.UUID(task["id"])
            )
            return bool(status == "PENDING")

        await eventually(pending, 30, "the task to be published")
        cancelled = await client.delete(f"/api/v1/tasks/{task['id']}")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "CANCELLED"

        processes.start("consumer")

        async def skipped() -> bool:
            return bool(
                await db.fetchval(
                    "SELECT count(*) FROM inbox i JOIN outbox o"
                    " ON i.message_id = o.id::text WHERE o.correlation_id = $1",
                    task["id"],
                )
            )

        await eventually(skipped, 30, "the consumer to take the cancelled message")
        final = (await client.get(f"/api/v1/tasks/{task['id']}")).json()
        assert final["status"] == "CANCELLED"
        assert final["attempts"] == 0 and final["started_at"] is None
        assert final["result"] is None

        finished = await client.delete(f"/api/v1/tasks/{first['id']}")
        assert finished.status_code == 409
        assert finished.headers["content-type"].startswith("application/problem+json")


async def test_bad_input_over_real_http_is_a_4xx_problem(
    processes: ProcessGroup, db: asyncpg.Connection
) -> None:
    processes.start("api")
    await processes.wait_ready()
    async with processes.api_client() as client:
        responses = [
            await client.post(
                "/api/v1/tasks",
                content=b"{",
                headers={"content-type": "application/json"},
            ),
            await client.post("/api/v1/tasks", json={"title": "t", "type": "nope"}),
            await client.post(
                "/api/v1/tasks",
                json={"title": "t", "type": "sleep", "payload": {"seconds": "x"}},
            ),
            await client.get("/api/v1/tasks", params={"cursor": "nope"}),
            await client.get(f"/api/v1/tasks/{uuid.uuid4()}"),
            await client.post("/api/v1/tasks", content=b"x" * (2 * 1024 * 1024)),
        ]
    assert [r.status_code for r in responses] == [400, 422, 422, 400, 404, 413]
    for response in responses:
        assert response.headers["content-type"].startswith("application/problem+json")
    assert await db.fetchval("SELECT count(*) FROM tasks") == 0


async def test_workers_serve_health_and_metrics(processes: ProcessGroup) -> None:
    relay_port, consumer_port = free_port(), free_port()
    processes.start("relay", RELAY_HEALTH_PORT=str(relay_port))
    processes.start("consumer", CONSUMER_HEALTH_PORT=str(consumer_port))

    async with httpx.AsyncClient(timeout=5) as client:
        for port in (relay_port, consumer_port):
            url = f"http://127.0.0.1:{port}"

            async def ready(url: str = url) -> bool:
                try:
                    response = await client.get(f"{url}/health/ready")
                except httpx.TransportError:
                    return False
                return response.status_code == 200

            await eventually(ready, 30, f"readiness on {url}")
            assert (await client.get(f"{url}/health/live")).status_code == 200
            metrics = await client.get(f"{url}/metrics")
            assert metrics.status_code == 200
            assert "python_info" in metrics.text
