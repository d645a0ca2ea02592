"""The measurements of the API, the relay, the consumer and the whole chain,
each beside its raw baseline in the same scratch database and broker.

Every function returns plain numbers keyed by name; ``bench.__main__`` turns
them into ratios against the targets. Rates are per second; latencies are
milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx

from bench import http, raw_amqp
from bench.env import (
    AMQP_URL,
    create_raw_tables,
    free_port,
    percentile,
    pipeline,
    scratch_database,
    scratch_prefix,
)

#: Concurrent HTTP clients of the peak-rate runs.
CLIENTS = 32
#: Seconds of load before each measured run, so pools and caches are warm.
WARM_UP_SECONDS = 2
#: Alternating peak runs of each side in the API group.
PEAK_ROUNDS = 2
#: A measurement that makes no progress for this long is a failure.
STALL_SECONDS = 90


@contextlib.contextmanager
def raw_api(
    log_dir: Path, mode: str, database_url: str, prefix: str = ""
) -> Iterator[str]:
    """The bare endpoint (``bench.raw_api``) as its own process; yields its URL."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"raw-api-{mode}.log").open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.raw_api",
                f"--mode={mode}",
                f"--port={port}",
                f"--database-url={database_url}",
                f"--amqp-url={AMQP_URL}",
                f"--prefix={prefix}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(port, process)
        yield f"http://127.0.0.1:{port}/tasks"
    finally:
        process.terminate()
        process.wait(30)


@contextlib.contextmanager
def raw_consumer(log_dir: Path, database_url: str, prefix: str) -> Iterator[None]:
    with (log_dir / "raw-consumer.log").open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.raw_amqp",
                "consume",
                f"--amqp-url={AMQP_URL}",
                f"--database-url={database_url}",
                f"--prefix={prefix}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield
    finally:
        process.terminate()
        process.wait(30)


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process on port {port} exited early")
        with contextlib.suppress(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


async def _warm(url: str, auth: str = "") -> None:
    await asyncio.to_thread(
        http.peak, url, connections=CLIENTS, seconds=WARM_UP_SECONDS, auth=auth
    )


async def _peak(
    url: str, seconds: int, auth: str = "", *, warm: bool = True
) -> http.LoadResult:
    if warm:
        await _warm(url, auth)
    return await asyncio.to_thread(
        http.peak, url, connections=CLIENTS, seconds=seconds, auth=auth
    )


async def _paced(
    url: str, rate: float, seconds: int, auth: str = ""
) -> http.LoadResult:
    return await asyncio.to_thread(
        http.paced, url, rate=rate, seconds=seconds, auth=auth
    )


@contextlib.asynccontextmanager
async def _scratch() -> AsyncIterator[tuple[str, asyncpg.Connection, str, str]]:
    """What one group measures in: a migrated database that also holds the
    raw baselines' tables, a connection to it, and two AMQP prefixes (the
    service's and the raw baselines'); all removed afterwards."""
    async with (
        scratch_database() as database_url,
        scratch_prefix() as prefix,
        scratch_prefix() as raw_prefix,
    ):
        conn = await asyncpg.connect(database_url)
        try:
            await create_raw_tables(conn)
            yield database_url, conn, prefix, raw_prefix
        finally:
            await conn.close()


async def api_figures(seconds: int, log_dir: Path) -> dict[str, float]:
    """Peak rate at ``CLIENTS`` clients and p99 at half the bare endpoint's
    peak, for the API and the bare endpoint; and the API's peak with the
    outbox's NOTIFY trigger on and off (a LISTEN connection open in both).

    Both servers run side by side (the one not under load idles) and their
    peaks alternate, ``PEAK_ROUNDS`` each, so a change in the machine's
    speed during the group weighs on both sides of a ratio alike; the same
    for the NOTIFY comparison. A rate is the mean of its rounds.
    """
    async with _scratch() as (database_url, conn, prefix, _):
        await conn.add_listener("outbox_pending", lambda *_: None)
        with (
            raw_api(log_dir, "outbox", database_url) as bare_url,
            pipeline(database_url, prefix, log_dir) as group,
        ):
            key = group.create_api_key("bench", "tasks:write")
            auth = f"Bearer {key}"
            group.start("api")
            await group.wait_ready()
            url = f"{group.api_url}/api/v1/tasks"

            await _warm(bare_url)
            await _warm(url, auth)
            bare_rates, api_rates = [], []
            for _ in range(PEAK_ROUNDS):
                bare_rates.append((await _peak(bare_url, seconds, warm=False)).rate)
                api_rates.append((await _peak(url, seconds, auth, warm=False)).rate)
            bare_rate = statistics.mean(bare_rates)

            bare_paced = await _paced(bare_url, bare_rate / 2, seconds)
            api_paced = await _paced(url, bare_rate / 2, seconds, auth)

            silent_rates, notified_rates = [], []
            for _ in range(PEAK_ROUNDS):
                await conn.execute("ALTER TABLE outbox DISABLE TRIGGER outbox_notify")
                silent_rates.append((await _peak(url, seconds, auth)).rate)
                await conn.execute("ALTER TABLE outbox ENABLE TRIGGER outbox_notify")
                notified_rates.append((await _peak(url, seconds, auth)).rate)
    return {
        "bare_rate": bare_rate,
        "api_rate": statistics.mean(api_rates),
        "bare_p99_ms": bare_paced.p99_ms,
        "api_p99_ms": api_paced.p99_ms,
        "paced_rate": bare_rate / 2,
        "api_rate_without_notify": statistics.mean(silent_rates),
        "api_rate_with_notify": statistics.mean(notified_rates),
    }


#: A backlog of tasks and their outbox rows as the API writes them, trace
#: context included: with no span exporter (the default) the API starts
#: traces unsampled, so the flags are ``00``.
BACKLOG_SQL = """
    WITH new_tasks AS (
        INSERT INTO tasks (id, title, type, payload, priority, status, max_attempts)
        SELECT gen_random_uuid(), 'bench', 'checksum', '{"text": "hello"}',
               'MEDIUM', 'NEW', 3
          FROM generate_series(1, $1)
        RETURNING id
    )
    INSERT INTO outbox (routing_key, body, headers, correlation_id)
    SELECT 'task.created',
           jsonb_build_object('task_id', id, 'type', 'checksum', 'status', 'NEW'),
           jsonb_build_object('traceparent', concat_ws(
               '-', '00', md5(id::text), left(md5(id::text || 's'), 16), '00')),
           id::text
      FROM new_tasks
"""


async def _vacuum(conn: asyncpg.Connection) -> None:
    """Vacuum and analyse the scratch database between two measurements.

    Every task is updated three times and every outbox row twice on its way
    through, and a server with autovacuum on (PostgreSQL's default) clears
    those dead rows as they pile up. A server with it off (this machine's
    runs so) never does, and every statement that reads the tables gets
    slower run after run. The benchmark measures the service on a maintained
    database, so it does autovacuum's work itself, at the same points for
    the raw baselines, whose tables share the database.
    """
    await conn.execute("VACUUM (ANALYZE)")


async def _rate_of(conn: asyncpg.Connection, remaining_sql: str, total: int) -> float:
    """Rows per second as ``remaining_sql``'s count falls from below
    ``total`` (the work has started) to zero, polled every 0.1 s; a process's
    start-up is not counted."""
    started: float | None = None
    start_remaining = total
    last_progress = time.monotonic()
    last = total
    while True:
        remaining = await conn.fetchval(remaining_sql)
        now = time.monotonic()
        if remaining < last:
            last, last_progress = remaining, now
        if started is None and remaining < total:
            started, start_remaining = now, remaining
        if remaining == 0:
            assert started is not None
            return (start_remaining or 1) / max(now - started, 1e-3)
        if now - last_progress > STALL_SECONDS:
            raise TimeoutError(f"stalled with {remaining} of {total} left")
        await asyncio.sleep(0.1)


async def stage_figures(backlog: int, log_dir: Path) -> dict[str, float]:
    """The relay draining ``backlog`` outbox rows, then the consumer draining
    the messages it published; beside raw confirmed publishing and raw
    consuming with an inbox insert, of as many messages."""
    async with _scratch() as (database_url, conn, prefix, raw_prefix):
        await conn.execute(BACKLOG_SQL, backlog)
        await conn.execute("VACUUM ANALYZE")
        bodies = [
            row["body"].encode()
            for row in await conn.fetch("SELECT body::text FROM outbox")
        ]
        raw_publish = await raw_amqp.publish(AMQP_URL, raw_prefix, bodies)
        raw_consume = await raw_amqp.consume(
            AMQP_URL, database_url, raw_prefix, len(bodies), complete=False
        )

        with pipeline(database_url, prefix, log_dir) as group:
            # Queues exist before the relay publishes (it treats an
            # unroutable message as a failure).
            await raw_amqp.declare(AMQP_URL, prefix)
            group.start("relay")
            relay = await _rate_of(
                conn,
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                backlog,
            )
            group.stop("relay")
            await _vacuum(conn)
            group.start("consumer")
            consumer = await _rate_of(
                conn,
                "SELECT count(*) FROM tasks WHERE status <> 'COMPLETED'",
                backlog,
            )
    return {
        "relay_rate": relay,
        "raw_publish_rate": raw_publish,
        "consumer_rate": consumer,
        "raw_consume_rate": raw_consume,
    }


async def _completion(
    conn: asyncpg.Connection, table: str, since: str = "-infinity"
) -> tuple[int, float, list[float]]:
    """Wait until every task in ``table`` created after ``since`` is
    COMPLETED; returns their count, the rate from first creation to last
    completion, and each task's submit-to-completed latency in ms."""
    where = f"created_at > '{since}'::timestamptz"
    last, last_progress = -1, time.monotonic()
    while True:
        remaining = await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE {where} AND status <> 'COMPLETED'"
        )
        if remaining == 0:
            break
        if remaining != last:
            last, last_progress = remaining, time.monotonic()
        elif time.monotonic() - last_progress > STALL_SECONDS:
            raise TimeoutError(f"{remaining} tasks in {table} never completed")
        await asyncio.sleep(0.2)
    rows = await conn.fetch(
        f"""
        SELECT extract(epoch FROM completed_at - created_at) * 1000 AS latency,
               extract(epoch FROM max(completed_at) OVER () - min(created_at) OVER ())
                   AS span
          FROM {table} WHERE {where}
        """
    )
    # extract() answers numeric, which asyncpg hands over as Decimal.
    span = float(rows[0]["span"])
    return len(rows), len(rows) / span, [float(r["latency"]) for r in rows]


async def _now(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT now()::text"))


async def end_to_end_figures(seconds: int, log_dir: Path) -> dict[str, float]:
    """Sustained submit-to-COMPLETED rate with every process on this machine
    and ``CLIENTS`` HTTP clients, then latency percentiles at half that rate;
    the same for the raw chain (bare endpoint publishing after commit, raw
    consumer), the latency at the same offered rate."""
    async with _scratch() as (database_url, conn, prefix, raw_prefix):
        with pipeline(database_url, prefix, log_dir) as group:
            key = group.create_api_key("bench", "tasks:write")
            auth = f"Bearer {key}"
            for name in ("consumer", "relay", "api"):
                group.start(name)
            await group.wait_ready()
            url = f"{group.api_url}/api/v1/tasks"
            await _peak(url, seconds, auth)
            _, sustained, _ = await _completion(conn, "tasks")
            await _vacuum(conn)
            since = await _now(conn)
            await _paced(url, sustained / 2, seconds, auth)
            _, _, latencies = await _completion(conn, "tasks", since)

        await raw_amqp.declare(AMQP_URL, raw_prefix)
        with (
            raw_consumer(log_dir, database_url, raw_prefix),
            raw_api(log_dir, "chain", database_url, raw_prefix) as raw_url,
        ):
            await _peak(raw_url, seconds)
            _, raw_sustained, _ = await _completion(conn, "raw_tasks")
            await _vacuum(conn)
            since = await _now(conn)
            await _paced(raw_url, sustained / 2, seconds)
            _, _, raw_latencies = await _completion(conn, "raw_tasks", since)
    return {
        "e2e_rate": sustained,
        "raw_chain_rate": raw_sustained,
        "e2e_p50_ms": percentile(latencies, 0.50),
        "e2e_p99_ms": percentile(latencies, 0.99),
        "raw_chain_p50_ms": percentile(raw_latencies, 0.50),
        "raw_chain_p99_ms": percentile(raw_latencies, 0.99),
    }
