"""The life cycle shared by the relay and the consumer processes.

Both run one main loop until SIGTERM or SIGINT, next to a health server and an
optional retention schedule, and stop all three through one event.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import structlog

from outbox_relay.health import ReadinessCheck, serve_health
from outbox_relay.retention import RetentionSchedule

logger = structlog.get_logger(__name__)


async def serve_worker(
    name: str,
    work: Callable[[asyncio.Event], Awaitable[None]],
    *,
    is_ready: ReadinessCheck,
    health_host: str,
    health_port: int,
    retention: RetentionSchedule | None,
    stopping_event: str | None = None,
) -> None:
    """Run ``work(stop)`` until a signal sets ``stop``, then wind everything down.

    ``stopping_event`` names the log line written when a signal arrives, for a
    worker that does not log its own stop.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(signum: signal.Signals) -> None:
        if stopping_event is not None:
            logger.info(stopping_event, signal=signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)

    if retention is not None:
        retention.start()
    health = asyncio.create_task(
        serve_health(name, health_host, health_port, is_ready, stop),
        name=f"{name}-health",
    )
    # A health server that dies takes the worker down with it: an
    # orchestrator that cannot probe the worker would restart it anyway.
    health.add_done_callback(lambda _task: stop.set())
    try:
        await work(stop)
    finally:
        stop.set()
        if retention is not None:
            await retention.stop()
        await health
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
