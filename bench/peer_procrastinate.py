"""The Procrastinate application of the peer benchmark: one no-op task.

The worker is started as ``procrastinate --app=bench.peer_procrastinate.app
worker`` and reads its database from ``BENCH_PROCRASTINATE_DATABASE_URL``;
the harness builds its own app with ``create_app``. Jobs go to Procrastinate's
default queue; a measurement has a database of its own, so nothing is shared.
"""

from __future__ import annotations

import os

import procrastinate

from consumer.settings import DEFAULT_PREFETCH

#: Environment variable the worker reads its database URL from.
DATABASE_URL_ENV = "BENCH_PROCRASTINATE_DATABASE_URL"

NOOP_TASK = "bench.noop"

#: Jobs the worker runs at once: the project consumer's default prefetch.
WORKER_CONCURRENCY = DEFAULT_PREFETCH


def create_app(database_url: str, *, pool_size: int) -> procrastinate.App:
    """An app on ``database_url`` with a psycopg pool of ``pool_size``
    connections (opened by ``open_async``, or by the CLI for a worker)."""
    connector = procrastinate.PsycopgConnector(
        conninfo=database_url, min_size=pool_size, max_size=pool_size
    )
    app = procrastinate.App(connector=connector)

    @app.task(name=NOOP_TASK)
    async def noop() -> None:
        """Does nothing: the worker then marks the job ``succeeded``, which is
        what the harness counts."""

    return app


# The CLI imports this module by name and cannot be handed arguments, so the
# harness passes the database through the environment it starts the worker
# with. Ten connections, like the pool the project's consumer keeps: more
# would take connections from the server without speeding the worker up,
# which fetches one job at a time.
app = create_app(os.environ.get(DATABASE_URL_ENV, ""), pool_size=10)
