"""Chaos: real processes killed and cut off at random while tasks pour in.

Two relays and three consumers run, each reaching RabbitMQ through its own
:class:`TcpProxy`. While a few hundred ``flaky_ledger`` tasks are submitted
over HTTP, a seeded injector SIGKILLs and restarts relays and consumers and
cuts or closes their proxies. Then everything is repaired, the system settles
and the database must show the invariants: every accepted task terminal, each
completed task's effect in the ledger exactly once, one completion event per
completed task and none for others, no terminal status ever changed, nothing
left claimed or locked.

The default run is CI-sized. ``scripts/chaos`` runs the long one
(``CHAOS_LONG=1``; size from ``CHAOS_TASKS``, ``CHAOS_SECONDS``,
``CHAOS_SEED``, ...) and prints its figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import AMQP_URL
from tests.handlers import LEDGER_TABLE_DDL
from tests.support.chaos import (
    ChaosPlan,
    FaultInjector,
    Submissions,
    format_figures,
    task_body,
)
from tests.support.faults import run_module
from tests.support.processes import ProcessGroup
from tests.support.proxy import TcpProxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")

#: Records every status change of a task, so that a terminal status changed
#: afterwards shows up even if it was changed back.
AUDIT_DDL = """
    CREATE TABLE test_status_audit (
        task_id uuid NOT NULL,
        old_status text NOT NULL,
        new_status text NOT NULL,
        changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE FUNCTION test_audit_status() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO test_status_audit (task_id, old_status, new_status)
        VALUES (OLD.id, OLD.status, NEW.status);
        RETURN NULL;
    END $$;
    CREATE TRIGGER test_audit_status AFTER UPDATE OF status ON tasks
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION test_audit_status();
"""

#: Settings that keep recovery quick enough for a test: short leases and
#: reconnects, and a delivery limit that repeated kills of consumers holding
#: the same prefetched messages do not reach.
RELAY_ENV = {"RELAY_LEASE_SECONDS": "15", "RELAY_PUBLISH_TIMEOUT": "5"}
CONSUMER_ENV = {
    "CONSUMER_PREFETCH": "8",
    "CONSUMER_DELIVERY_LIMIT": "20",
    "CONSUMER_SHUTDOWN_GRACE_SECONDS": "5",
    "TASK_TIME_LIMIT_SECONDS": "30",
    "TASK_TIME_LIMIT_GRACE_SECONDS": "5",
    "TASK_SWEEP_INTERVAL_SECONDS": "2",
}

LONG_RUN = os.environ.get("CHAOS_LONG") == "1"


def broker_port() -> int:
    return int(AMQP_URL.rsplit(":", 1)[1].split("/")[0])


async def submit_all(
    group: ProcessGroup, plan: ChaosPlan, rng: random.Random
) -> Submissions:
    """Submit ``plan.tasks`` tasks, spread over most of the fault phase."""
    bodies = [task_body(rng, index) for index in range(plan.tasks)]
    spread = plan.seconds * 0.8
    submissions = Submissions()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(plan.tasks):
        queue.put_nowait(index)

    async def submitter(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            due = submissions.started + spread * index / plan.tasks
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                response = await client.post("/api/v1/tasks", json=bodies[index])
            except httpx.TransportError as exc:
                submissions.refused[type(exc).__name__] += 1
                continue
            if response.status_code == 201:
                submissions.accepted[response.json()["id"]] = bodies[index]
            else:
                submissions.refused[str(response.status_code)] += 1

    async with group.api_client() as client:
        await asyncio.gather(*(submitter(client) for _ in range(plan.submitters)))
    submissions.finished = time.monotonic()
    return submissions


async def check_invariants(
    db: asyncpg.Connection, accepted: dict[str, dict[str, Any]]
) -> dict[str, bool]:
    """Each invariant by name, read from the database after the run."""
    tasks = {
        str(row["id"]): row
        for row in await db.fetch(
            "SELECT id, status, result, started_at, completed_at FROM tasks"
        )
    }
    ledger: dict[str, list[int]] = {}
    for row in await db.fetch("SELECT task_id, amount FROM test_ledger"):
        ledger.setdefault(str(row["task_id"]), []).append(row["amount"])
    events: dict[tuple[str, str], int] = {
        (row["correlation_id"], row["routing_key"]): row["n"]
        for row in await db.fetch(
            "SELECT correlation_id, routing_key, count(*) AS n FROM outbox"
            " WHERE routing_key IN ('task.completed', 'task.failed')"
            " GROUP BY correlation_id, routing_key"
        )
    }
    completed = {tid for tid, row in tasks.items() if row["status"] == "COMPLETED"}
    failed = {tid for tid, row in tasks.items() if row["status"] == "FAILED"}

    def one_event(kind: str, owners: set[str]) -> bool:
        return all(
            events.get((tid, kind), 0) == (1 if tid in owners else 0) for tid in tasks
        )

    overwritten = await db.fetchval(
        "SELECT count(*) FROM test_status_audit WHERE old_status = ANY($1::text[])",
        list(TERMINAL),
    )
    unpublished = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE published_at IS NULL"
    )
    claimed = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE claimed_by IS NOT NULL"
        " OR leased_until IS NOT NULL"
    )
    locks = await db.fetchval(
        """
        SELECT count(*) FROM pg_locks
         WHERE database = (SELECT oid FROM pg_database
                            WHERE datname = current_database())
           AND pid <> pg_backend_pid()
        """
    )
    return {
        "every accepted task terminal": all(
            tid in tasks and tasks[tid]["status"] in TERMINAL for tid in accepted
        ),
        # A task whose 201 was lost on the way back is in the database too.
        "every task terminal": all(row["status"] in TERMINAL for row in tasks.values()),
        "effect recorded exactly once per completed task": all(
            ledger.get(tid, [])
            == ([body["payload"]["amount"]] if tid in completed else [])
            for tid, body in accepted.items()
        ),
        "one task.completed per completed task, none for others": one_event(
            "task.completed", completed
        ),
        "one task.failed per failed task, none for others": one_event(
            "task.failed", failed
        ),
        "no terminal status overwritten": overwritten == 0,
        "completed tasks consistent": all(
            tasks[tid]["result"] is not None
            and tasks[tid]["completed_at"] >= tasks[tid]["started_at"]
            for tid in completed
        ),
        "every outbox row published": unpublished == 0,
        "no outbox row claimed after stop": claimed == 0,
        "no locks after stop": locks == 0,
    }


async def dead_letter_count(group: ProcessGroup) -> int:
    listed = await run_module(group, "consumer", "dead-letters", "list", "--json")
    if listed.returncode != 0:
        return -1
    return len(json.loads(listed.stdout))


async def run_chaos(
    plan: ChaosPlan, group: ProcessGroup, db: asyncpg.Connection
) -> dict[str, Any]:
    """One whole run; returns its figures, invariants included."""
    await db.execute(LEDGER_TABLE_DDL)
    await db.execute(AUDIT_DDL)
    rng = random.Random(plan.seed)
    names = plan.relay_names + plan.consumer_names
    proxies = {name: TcpProxy(broker_port()) for name in names}
    env: dict[str, dict[str, str]] = {}
    for name, proxy in proxies.items():
        await proxy.open()
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?reconnect_interval=1"
        extra = RELAY_ENV if name.startswith("relay") else CONSUMER_ENV
        env[name] = {**extra, "AMQP_URL": url}

    try:
        group.start("api")
        for name in plan.consumer_names:
            group.start(name, **env[name])
        await group.wait_ready()
        # Consumers declare the queues; a relay publishing before that would
        # count its first rows as unroutable.
        await eventually(lambda: queues_declared(group), 30, "the work queue")
        for name in plan.relay_names:
            group.start(name, **env[name])

        started = time.monotonic()
        stop_faults = asyncio.Event()
        injector = FaultInjector(group, proxies, env, rng, plan.fault_interval)
        faults = asyncio.create_task(injector.run(stop_faults), name="chaos-faults")
        submitted = asyncio.create_task(
            submit_all(group, plan, random.Random(plan.seed + 1)),
            name="chaos-submit",
        )
        await asyncio.sleep(plan.seconds)
        submissions = await submitted
        stop_faults.set()
        await faults
        repaired = time.monotonic()

        accepted = submissions.accepted

        async def settled() -> bool:
            unfinished = await db.fetchval(
                """
                SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL)
                     + (SELECT count(*) FROM tasks
                         WHERE status <> ALL($1::text[]))
                """,
                list(TERMINAL),
            )
            return bool(unfinished == 0)

        await eventually(settled, plan.settle_seconds, "the system to settle")
        finished = time.monotonic()
        dead_letters = await dead_letter_count(group)
        # In a thread: the proxies run on this loop, and a process closing
        # its broker connection politely needs them to answer.
        codes = await asyncio.to_thread(group.stop_all)
        invariants = await check_invariants(db, accepted)
        invariants["every process exited 0 on SIGTERM"] = all(
            code == 0 for code in codes.values()
        )
        invariants["dead-letter queue empty"] = dead_letters == 0
    finally:
        for proxy in proxies.values():
            await proxy.close()

    statuses = dict(
        (row["status"], row["n"])
        for row in await db.fetch(
            "SELECT status, count(*) AS n FROM tasks GROUP BY status ORDER BY 1"
        )
    )
    retried = await db.fetchval("SELECT count(*) FROM tasks WHERE attempts > 1")
    duration = finished - started
    return {
        "seed": plan.seed,
        "tasks submitted": plan.tasks,
        "tasks accepted (201)": len(accepted),
        "submissions refused": dict(submissions.refused),
        "final statuses": statuses,
        "tasks run more than once": retried,
        "relay kills": injector.counts["kill_relay"],
        "consumer kills": injector.counts["kill_consumer"],
        "connection cuts": injector.counts["cut"],
        "broker outages (proxy closed)": injector.counts["outage"],
        "fault phase seconds": round(repaired - started, 1),
        "settle seconds": round(finished - repaired, 1),
        "duration seconds": round(duration, 1),
        "throughput tasks/s": round(len(accepted) / duration, 1),
        "invariants": {
            name: "ok" if held else "VIOLATED" for name, held in invariants.items()
        },
    }


async def queues_declared(group: ProcessGroup) -> bool:
    events = [event.get("event") for event in group.log_events("consumer")]
    return "consumer_started" in events


def report(figures: dict[str, Any]) -> None:
    printable = {
        name: json.dumps(value) if isinstance(value, dict) else value
        for name, value in figures.items()
        if name != "invariants"
    }
    print("\n" + format_figures(printable))
    print(format_figures(figures["invariants"]))
    path = os.environ.get("CHAOS_REPORT")
    if path:
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")


def assert_invariants(figures: dict[str, Any], group: ProcessGroup) -> None:
    violated = [
        name for name, verdict in figures["invariants"].items() if verdict != "ok"
    ]
    assert not violated, (violated, group.log_text())


@pytest.mark.timeout(240)
async def test_chaos(processes: ProcessGroup, db: asyncpg.Connection) -> None:
    plan = ChaosPlan(
        tasks=300, seconds=40.0, seed=int(os.environ.get("CHAOS_SEED", 11))
    )
    figures = await run_chaos(plan, processes, db)
    report(figures)
    assert_invariants(figures, processes)


@pytest.mark.chaos_long
@pytest.mark.skipif(not LONG_RUN, reason="the long chaos run: scripts/chaos")
@pytest.mark.timeout(0)
async def test_chaos_long(processes: ProcessGroup, db: asyncpg.Connection) -> None:
    plan = ChaosPlan.from_env(
        tasks=10_000, seconds=900.0, seed=random.SystemRandom().randrange(1 << 30)
    )
    figures = await run_chaos(plan, processes, db)
    report(figures)
    assert_invariants(figures, processes)
