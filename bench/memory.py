"""Does any process of the pipeline grow with the number of tasks it has seen?

A process that keeps something per task (a cache without a bound, a map of
finished work, a metric label per id) grows with the traffic it served. This
runs the api, the relay and the consumer with the product's defaults, pushes
``small`` tasks through them and then more up to ``large``, and reads each
process's resident memory once all tasks of a step are ``COMPLETED``: a
process that holds nothing per task stays flat from one point to the next.
Tasks are posted by hey, outside the measured processes, so the client's
memory is not in the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.env import TASK_BODY, pipeline, scratch_database, scratch_prefix
from tests.support.processes import ProcessGroup

PROCESSES = ("api", "relay", "consumer")
CONCURRENCY = 32

#: A step fails when the number of completed tasks has not moved for this
#: long: the pipeline stalled, and waiting longer would only hide it.
STALL_SECONDS = 120.0
#: A bound on a whole step however steady its progress: 200,000 tasks at a
#: rate a hundred times below what the pipeline does on a laptop.
STEP_SECONDS = 4 * 3600.0
READY_SECONDS = 60.0
POLL_SECONDS = 1.0
#: How often resident memory is sampled during a step, for its peak.
SAMPLE_SECONDS = 0.5

#: Connections the three processes may open at most with their defaults:
#: the API's pool (10), the consumer's (10), the relay's pool and LISTEN
#: connection (3), plus the key CLI and this module's own, with room to spare.
CONNECTIONS_NEEDED = 40
#: How long to wait for other users of the server to leave that many free.
CONNECTIONS_WAIT_SECONDS = 600.0

_STATUS_LINE = re.compile(r"\[(\d{3})\]\s+(\d+) responses")


class PipelineStalledError(TimeoutError):
    """The tasks of a step did not all complete in time."""


class SubmissionError(RuntimeError):
    """Not every task was accepted with 201."""


async def rss_growth(
    small: int = 10_000, large: int = 200_000, *, log_dir: Path, steps: int = 1
) -> dict[str, Any]:
    """Resident memory of each process after ``small`` and after ``large``
    tasks in total went through the whole pipeline.

    Tasks are posted ``small`` first, then up to ``large`` in ``steps``
    equal steps; after each step, once every task so far is ``COMPLETED``,
    each process's RSS (its own plus any children's) is read. Returns::

        {"small", "large",
         "idle": {process: bytes},          # just after start-up
         "after_small": {process: bytes},
         "after_large": {process: bytes},
         "growth": {process: after_large / after_small},
         "bytes_per_task": {process: (after_large - after_small)
                                      / (large - small)},
         "checkpoints": [{"tasks", "rss", "peak", "submit_seconds",
                          "complete_seconds", "tasks_per_second"}, ...]}

    where a checkpoint's ``peak`` is the highest RSS sampled while its step
    ran. Processes are ``api``, ``relay`` and ``consumer``.

    Raises ``SubmissionError`` if any request was answered otherwise than
    201 (or the tasks table does not hold one task per request), and
    ``PipelineStalledError`` if completions stop moving for
    ``STALL_SECONDS`` or a process exits. Everything runs in a scratch
    database and AMQP prefix on 127.0.0.1, removed afterwards with the
    processes; the processes' logs stay in ``log_dir``.
    """
    if not 0 < small < large or steps < 1:
        raise ValueError("need 0 < small < large and steps >= 1")
    totals = [small] + [
        small + (large - small) * (step + 1) // steps for step in range(steps)
    ]

    async with scratch_database() as url, scratch_prefix() as prefix:
        db = await asyncpg.connect(
            url, server_settings={"application_name": "bench.memory"}
        )
        try:
            await _wait_for_connections(db)
            with pipeline(url, prefix, log_dir) as group:
                idle, checkpoints = await _measure(group, db, totals)
        finally:
            await db.close()

    after_small, after_large = checkpoints[0]["rss"], checkpoints[-1]["rss"]
    return {
        "small": small,
        "large": large,
        "idle": idle,
        "after_small": after_small,
        "after_large": after_large,
        "growth": {
            name: round(after_large[name] / after_small[name], 3) for name in PROCESSES
        },
        "bytes_per_task": {
            name: round((after_large[name] - after_small[name]) / (large - small), 1)
            for name in PROCESSES
        },
        "checkpoints": checkpoints,
    }


async def _measure(
    group: ProcessGroup, db: asyncpg.Connection, totals: list[int]
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    for name in PROCESSES:
        group.start(name)
    await group.wait_ready(READY_SECONDS)
    # The consumer declares the queues; a task posted before they exist is
    # unroutable and waits out the relay's back-off, which would be measured
    # as a slow pipeline.
    await _wait_for_event(group, "consumer", "consumer_started")
    key = await asyncio.to_thread(group.create_api_key, "bench-memory", "tasks:write")

    idle = _rss(group)
    checkpoints = []
    done = 0
    for total in totals:
        checkpoints.append(await _step(group, db, key, total - done, total))
        done = total
    return idle, checkpoints


async def _step(
    group: ProcessGroup, db: asyncpg.Connection, key: str, count: int, total: int
) -> dict[str, Any]:
    """Post ``count`` tasks, wait until all ``total`` are COMPLETED, and read
    each process's RSS; with the step's timings and peak RSS."""
    peak = dict.fromkeys(PROCESSES, 0)
    sampler = asyncio.create_task(_sample_peak(group, peak), name="bench-rss-peak")
    try:
        started = time.monotonic()
        await _submit(group, key, count)
        submitted = time.monotonic()

        stored = await db.fetchval("SELECT count(*) FROM tasks")
        if stored != total:
            raise SubmissionError(f"{stored} tasks stored, {total} expected")

        await _wait_completed(group, db, total)
        completed = time.monotonic()
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler

    return {
        "tasks": total,
        "rss": _rss(group),
        "peak": peak,
        "submit_seconds": round(submitted - started, 2),
        "complete_seconds": round(completed - started, 2),
        "tasks_per_second": round(count / (completed - started), 1),
    }


async def _submit(group: ProcessGroup, key: str, count: int) -> None:
    # hey gives each of its workers ``-n / -c`` requests, rounded down, so a
    # remainder goes in a second run with one worker per request.
    full, rest = divmod(count, CONCURRENCY)
    if full:
        await _hey(group, key, full * CONCURRENCY, CONCURRENCY)
    if rest:
        await _hey(group, key, rest, rest)


async def _hey(group: ProcessGroup, key: str, count: int, workers: int) -> None:
    process = await asyncio.create_subprocess_exec(
        "hey",
        "-n",
        str(count),
        "-c",
        str(workers),
        "-t",
        "30",
        "-m",
        "POST",
        "-T",
        "application/json",
        "-H",
        f"Authorization: Bearer {key}",
        "-d",
        TASK_BODY.decode(),
        f"{group.api_url}/api/v1/tasks",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # hey gives up on a request after 30 s, so even a hung API ends the
        # run; the bound below is for hey itself.
        async with asyncio.timeout(STEP_SECONDS):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise

    report = out.decode()
    statuses = {int(code): int(n) for code, n in _STATUS_LINE.findall(report)}
    if process.returncode != 0 or statuses != {201: count}:
        raise SubmissionError(
            f"hey exited {process.returncode} with statuses {statuses} for"
            f" {count} requests:\n{report[-2000:]}\n{err.decode()[-2000:]}"
        )


async def _wait_completed(
    group: ProcessGroup, db: asyncpg.Connection, total: int
) -> None:
    deadline = time.monotonic() + STEP_SECONDS
    last_change = time.monotonic()
    done = -1
    while True:
        now_done = await db.fetchval(
            "SELECT count(*) FROM tasks WHERE status = 'COMPLETED'"
        )
        if now_done == total:
            return
        for name in PROCESSES:
            if group.running[name].poll() is not None:
                raise PipelineStalledError(f"{name} exited:\n{group.log_text()}")
        now = time.monotonic()
        if now_done != done:
            done, last_change = now_done, now
        elif now - last_change > STALL_SECONDS:
            raise PipelineStalledError(
                f"{done} of {total} completed, no progress for {STALL_SECONDS:.0f}"
                f" s; by status: {await _by_status(db)}\n{group.log_text()}"
            )
        if now > deadline:
            raise PipelineStalledError(
                f"{done} of {total} completed after {STEP_SECONDS:.0f} s"
            )
        await asyncio.sleep(POLL_SECONDS)


async def _by_status(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch("SELECT status, count(*) AS n FROM tasks GROUP BY status")
    return {row["status"]: row["n"] for row in rows}


async def _wait_for_connections(db: asyncpg.Connection) -> None:
    # A process refused a connection at start-up retries it as an outage,
    # which would be measured as a slow pipeline, or never gets ready.
    deadline = time.monotonic() + CONNECTIONS_WAIT_SECONDS
    while True:
        free = await db.fetchval(
            "SELECT current_setting('max_connections')::int - count(*)"
            "  FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )
        if free >= CONNECTIONS_NEEDED:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"PostgreSQL has {free} free connections, the pipeline needs up"
                f" to {CONNECTIONS_NEEDED}"
            )
        await asyncio.sleep(5)


async def _wait_for_event(group: ProcessGroup, name: str, event: str) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while not any(e.get("event") == event for e in group.log_events(name)):
        if group.running[name].poll() is not None:
            raise RuntimeError(f"{name} exited:\n{group.log_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} never logged {event}:\n{group.log_text()}")
        await asyncio.sleep(0.2)


def _rss(group: ProcessGroup) -> dict[str, int]:
    """RSS in bytes per process, its children's included (none today, but a
    server started with workers would hide its memory in them)."""
    sizes = {}
    for name in PROCESSES:
        process = psutil.Process(group.running[name].pid)
        family = [process, *process.children(recursive=True)]
        sizes[name] = sum(p.memory_info().rss for p in family)
    return sizes


async def _sample_peak(group: ProcessGroup, peak: dict[str, int]) -> None:
    while True:
        with contextlib.suppress(psutil.NoSuchProcess):
            for name, rss in _rss(group).items():
                peak[name] = max(peak[name], rss)
        await asyncio.sleep(SAMPLE_SECONDS)


def main() -> None:
    """``python -m bench.memory [SMALL LARGE [STEPS]]``: print the result as
    JSON."""
    args = [int(arg) for arg in sys.argv[1:4]]
    sizes, steps = args[:2] or [10_000, 200_000], (args[2:] or [1])[0]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as logs:
        result = asyncio.run(rss_growth(*sizes, log_dir=Path(logs), steps=steps))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
