"""Throughput of the task queues a user would pick instead of this project.

Each peer runs the same no-op work as the project's benchmark, submitting and
processing at the same time: its worker is already running when the harness
starts submitting, and the figure is ``tasks / (first submit -> last
completion)``. Every peer keeps the guarantee the project's relay keeps for
submission: a task counts as submitted once it is durable on its broker.

- **Celery** (``bench.peer_celery``) on RabbitMQ through ``pyamqp``, with
  publisher confirms and persistent messages, no result backend. The worker is
  Celery's default: the prefork pool with one process per CPU (2 here) and a
  prefetch multiplier of 4, logging at INFO as in Celery's own tutorial (the
  project logs one INFO line per message too). The Celery client is
  synchronous, so ``CELERY_SUBMITTERS`` threads call ``apply_async``, each
  waiting for its confirm; that is within the client's default pool of ten
  broker connections. A task records its completion by appending one byte to
  a file, whose size the harness polls.
- **Procrastinate** (``bench.peer_procrastinate``) on its own scratch
  database. The worker runs ``WORKER_CONCURRENCY`` jobs at once, the
  project consumer's prefetch, instead of Procrastinate's default of one job
  at a time, which no user after throughput keeps; it logs at INFO, its
  default. The worker fetches jobs one at a time, one transaction each, so
  for no-op jobs the commit latency of the server, not the concurrency, sets
  the pace. ``PROCRASTINATE_SUBMITTERS`` coroutines call ``defer_async``
  through a pool of ``PROCRASTINATE_SUBMIT_POOL`` connections, and the
  harness counts the jobs in status ``succeeded``.

Both raise ``PeerStalledError`` when neither submission nor processing moves
for ``STALL_SECONDS``, stop their worker (SIGTERM, then SIGKILL after
``STOP_SECONDS``) and remove what they created, whatever happens.

``python -m bench.peers [TASKS] [LOG_DIR]`` prints both rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from celery import Celery

from bench import figures, peer_celery, peer_procrastinate
from bench.env import AMQP_URL, ROOT, scratch_database

#: Seconds without any submission or completion before a run is abandoned.
STALL_SECONDS = 60.0
#: Seconds a worker gets to stop after SIGTERM before it is killed.
STOP_SECONDS = 30.0
#: Seconds a worker gets to become ready.
READY_SECONDS = 60.0
#: How often completions are counted while a run is going: often enough to
#: time a run of seconds, rarely enough that counting Procrastinate's jobs
#: takes little from the database being measured.
POLL_SECONDS = 0.1

#: Threads publishing to Celery, each with one publish awaiting its confirm.
CELERY_SUBMITTERS = 8
#: Coroutines deferring Procrastinate jobs, as many as the HTTP clients that
#: submit to this service in the end-to-end figure.
PROCRASTINATE_SUBMITTERS = figures.CLIENTS
#: Connections the submitting coroutines share, as the API's pool would be.
PROCRASTINATE_SUBMIT_POOL = 10


class PeerStalledError(TimeoutError):
    """Neither submission nor processing made progress for ``STALL_SECONDS``."""


class PeerWorkerExitedError(RuntimeError):
    """A peer's worker process ended while the measurement needed it."""


@contextlib.asynccontextmanager
async def _worker(
    argv: Sequence[str], env: dict[str, str], log_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``argv`` for the duration of the block, output to ``log_path``.

    The worker leads a process group of its own, so a worker that ignores
    SIGTERM is killed together with the pool processes it forked.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *argv,
            # Run outside the checkout so a developer's .env cannot leak in.
            cwd=log_path.parent,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_SECONDS)
            except TimeoutError:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()


def _check_alive(process: asyncio.subprocess.Process, log_path: Path) -> None:
    if process.returncode is not None:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise PeerWorkerExitedError(
            f"worker exited with {process.returncode}; log tail:\n{tail}"
        )


async def _measure(
    tasks: int,
    submit: Callable[[], Coroutine[Any, Any, None]],
    submitted: Callable[[], int],
    completed: Callable[[], Awaitable[int]],
    check_worker: Callable[[], None],
) -> float:
    """Run ``submit`` while polling ``completed`` until it reaches ``tasks``;
    returns tasks per second from the start of ``submit`` to the poll that
    saw the last completion.

    ``submitted`` and ``completed`` only serve progress: a run in which
    neither changes for ``STALL_SECONDS`` raises ``PeerStalledError``.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be at least 1, not {tasks}")

    started = time.perf_counter()
    submission = asyncio.create_task(submit(), name="peer submission")
    try:
        last_progress = (-1, -1)
        last_progress_at = started
        while True:
            done = await completed()
            if done >= tasks:
                finished = time.perf_counter()
                break

            # A failed submission would otherwise look like a stall.
            if submission.done():
                submission.result()
            check_worker()

            progress = (submitted(), done)
            now = time.perf_counter()
            if progress != last_progress:
                last_progress, last_progress_at = progress, now
            elif now - last_progress_at > STALL_SECONDS:
                raise PeerStalledError(
                    f"{progress[0]} submitted, {done} of {tasks} completed, "
                    f"nothing moved for {STALL_SECONDS:.0f} s"
                )
            await asyncio.sleep(POLL_SECONDS)

        await submission
    finally:
        if not submission.done():
            submission.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await submission
    return tasks / (finished - started)


async def _delete_amqp(queues: Sequence[str], exchanges: Sequence[str]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                # A failed delete closes its channel, so each gets its own.
                channel = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
    finally:
        await connection.close()


async def _wait_celery_ready(
    app: Celery,
    hostname: str,
    process: asyncio.subprocess.Process,
    log_path: Path,
) -> None:
    """Return once the worker answers a ping, so it is consuming."""
    deadline = time.monotonic() + READY_SECONDS
    while not await asyncio.to_thread(
        app.control.ping, destination=[hostname], timeout=0.5
    ):
        _check_alive(process, log_path)
        if time.monotonic() > deadline:
            raise TimeoutError(f"celery worker not ready after {READY_SECONDS} s")


async def celery_rate(tasks: int, log_dir: Path) -> float:
    """Tasks per second of a Celery worker on RabbitMQ (see the module
    docstring), from the first ``apply_async`` to the last task run.

    The worker's log is ``log_dir/celery-worker.log``. The queue, exchanges
    and control queue the run declared are deleted afterwards.
    """
    prefix = f"bench-{secrets.token_hex(5)}"
    hostname = f"{prefix}@{socket.gethostname()}"
    log_path = log_dir / "celery-worker.log"
    client = peer_celery.create_app(prefix, AMQP_URL)
    noop = client.tasks[peer_celery.NOOP_TASK]
    argv = [
        sys.executable,
        *("-m", "celery", "-A", "bench.peer_celery", "worker"),
        *("--loglevel", "INFO", "--hostname", hostname),
    ]
    env = {peer_celery.PREFIX_ENV: prefix, peer_celery.BROKER_ENV: AMQP_URL}
    stop = threading.Event()
    counts = [0] * CELERY_SUBMITTERS
    # Threads of their own: the loop's default executor may have fewer than
    # CELERY_SUBMITTERS, and the readiness pings use it too.
    submitters = ThreadPoolExecutor(CELERY_SUBMITTERS, "celery-submitter")

    def submit_share(index: int, done_path: str) -> None:
        for _ in range(index, tasks, CELERY_SUBMITTERS):
            if stop.is_set():
                return
            noop.apply_async(args=(done_path,))
            counts[index] += 1

    try:
        with tempfile.TemporaryDirectory(prefix="bench-celery-") as scratch:
            done_path = Path(scratch) / "done"
            done_path.touch()

            async def submit() -> None:
                loop = asyncio.get_running_loop()
                await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            submitters, submit_share, index, str(done_path)
                        )
                        for index in range(CELERY_SUBMITTERS)
                    )
                )

            async def completed() -> int:
                return done_path.stat().st_size

            async with _worker(argv, env, log_path) as process:
                await _wait_celery_ready(client, hostname, process, log_path)
                try:
                    return await _measure(
                        tasks,
                        submit,
                        lambda: sum(counts),
                        completed,
                        lambda: _check_alive(process, log_path),
                    )
                finally:
                    # Threads cannot be cancelled; they read this between tasks.
                    stop.set()
    finally:
        submitters.shutdown(wait=False, cancel_futures=True)
        client.close()
        await _delete_amqp(*peer_celery.amqp_names(prefix, hostname))


async def _wait_procrastinate_ready(
    conn: asyncpg.Connection, process: asyncio.subprocess.Process, log_path: Path
) -> None:
    """Return once the worker has registered itself, just before it starts
    listening and fetching."""
    deadline = time.monotonic() + READY_SECONDS
    while not await conn.fetchval("SELECT count(*) FROM procrastinate_workers"):
        _check_alive(process, log_path)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"procrastinate worker not ready after {READY_SECONDS} s"
            )
        await asyncio.sleep(POLL_SECONDS)


async def procrastinate_rate(tasks: int, log_dir: Path) -> float:
    """Jobs per second of a Procrastinate worker (see the module docstring),
    from the first ``defer_async`` to the last job ``succeeded``.

    The worker's log is ``log_dir/procrastinate-worker.log``. Everything
    lives in a scratch database, dropped afterwards.
    """
    log_path = log_dir / "procrastinate-worker.log"
    argv = [
        sys.executable,
        *("-m", "procrastinate", "--app=bench.peer_procrastinate.app", "worker"),
        *("--concurrency", str(peer_procrastinate.WORKER_CONCURRENCY)),
    ]
    async with scratch_database(migrated=False) as database_url:
        client = peer_procrastinate.create_app(
            database_url, pool_size=PROCRASTINATE_SUBMIT_POOL
        )
        env = {peer_procrastinate.DATABASE_URL_ENV: database_url}
        conn = await asyncpg.connect(database_url)
        try:
            async with client.open_async():
                await client.schema_manager.apply_schema_async()
                noop = client.tasks[peer_procrastinate.NOOP_TASK]
                submitted = 0

                async def submit_share(count: int) -> None:
                    nonlocal submitted
                    for _ in range(count):
                        await noop.defer_async()
                        submitted += 1

                async def submit() -> None:
                    shares = [
                        len(range(index, tasks, PROCRASTINATE_SUBMITTERS))
                        for index in range(PROCRASTINATE_SUBMITTERS)
                    ]
                    await asyncio.gather(*(submit_share(n) for n in shares))

                async def completed() -> int:
                    count: int = await conn.fetchval(
                        "SELECT count(*) FROM procrastinate_jobs"
                        " WHERE status = 'succeeded'"
                    )
                    return count

                async with _worker(argv, env, log_path) as process:
                    await _wait_procrastinate_ready(conn, process, log_path)
                    return await _measure(
                        tasks,
                        submit,
                        lambda: submitted,
                        completed,
                        lambda: _check_alive(process, log_path),
                    )
        finally:
            await conn.close()


async def _main(tasks: int, log_dir: Path) -> None:
    celery = await celery_rate(tasks, log_dir)
    print(f"celery        {tasks} tasks: {celery:8.0f} tasks/s")
    procrastinate = await procrastinate_rate(tasks, log_dir)
    print(f"procrastinate {tasks} tasks: {procrastinate:8.0f} tasks/s")


if __name__ == "__main__":
    asyncio.run(
        _main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 2000,
            Path(sys.argv[2] if len(sys.argv) > 2 else "bench-logs/peers"),
        )
    )
