"""The Celery application of the peer benchmark: one no-op task on RabbitMQ.

The worker is started as ``python -m celery -A bench.peer_celery worker`` and
finds ``app`` below; the harness builds its own client with ``create_app``.
Both learn the AMQP names from the same prefix, so one measurement's queue,
exchanges and control queues never meet another's and can all be deleted
afterwards (see ``amqp_names``).

Settings are Celery's defaults except what the comparison needs: publisher
confirms on (messages are persistent by default), no result backend, and
every exchange and queue named after the prefix instead of ``celery``.
"""

from __future__ import annotations

import os

from celery import Celery

#: Environment variables the worker reads its prefix and broker from.
PREFIX_ENV = "BENCH_CELERY_PREFIX"
BROKER_ENV = "BENCH_CELERY_BROKER_URL"

NOOP_TASK = "bench.noop"


def amqp_names(prefix: str, worker_hostname: str) -> tuple[list[str], list[str]]:
    """The queues and exchanges a worker named ``worker_hostname`` and its
    clients declare under ``prefix``: ``(queues, exchanges)``.

    Event and reply queues are not listed: the broker drops them by itself
    (auto-delete) once their connection closes.
    """
    control = f"{prefix}.control"
    queues = [prefix, f"{worker_hostname}.{control}.pidbox"]
    exchanges = [
        prefix,
        f"{control}.pidbox",
        f"reply.{control}.pidbox",
        f"{prefix}.events",
    ]
    return queues, exchanges


def create_app(prefix: str, broker_url: str) -> Celery:
    """A Celery app whose tasks go to the durable queue named ``prefix``."""
    app = Celery(prefix, broker=broker_url, set_as_current=False)
    app.conf.update(
        # Without confirms a publish returns before the broker has the
        # message; the project's relay waits for them, so the peer does too.
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_default_queue=prefix,
        task_default_exchange=prefix,
        task_default_routing_key=prefix,
        control_exchange=f"{prefix}.control",
        event_exchange=f"{prefix}.events",
        event_queue_prefix=f"{prefix}.events",
    )

    # Not shared: the harness's app and the module's own would otherwise
    # each receive the other's copy of the task.
    @app.task(name=NOOP_TASK, shared=False)  # type: ignore[untyped-decorator]
    def noop(done_path: str) -> None:
        """Append one byte to ``done_path``: its size is the number of tasks
        run. An ``O_APPEND`` write of one byte is atomic between the pool's
        processes and costs microseconds, far below a task's own overhead."""
        fd = os.open(done_path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)

    return app


# The worker imports this module by name and cannot be handed arguments, so
# the harness passes them through the environment it starts the worker with.
app = create_app(
    os.environ.get(PREFIX_ENV, "bench-peer"),
    os.environ.get(BROKER_ENV, "amqp://guest:guest@127.0.0.1:5672/"),
)
