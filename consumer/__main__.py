"""``python -m consumer``: run task handlers for messages until SIGTERM or SIGINT.

On either signal the consumer stops taking messages, lets running tasks finish
within ``CONSUMER_SHUTDOWN_GRACE_SECONDS`` and exits 0; tasks still running
then are cancelled and their messages redelivered to another consumer.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog

from consumer.consumer import TaskConsumer
from consumer.settings import ConsumerSettings
from outbox_relay.config import load_env_file, load_settings
from outbox_relay.errors import SettingsError
from outbox_relay.health import serve_health
from outbox_relay.logs import configure_logging
from service.registry import HandlerRegistry, load_registry

logger = structlog.get_logger("consumer")


async def _serve(settings: ConsumerSettings, registry: HandlerRegistry) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    consumer = TaskConsumer(settings, registry)
    health = asyncio.create_task(
        serve_health(
            "consumer",
            settings.consumer_health_host,
            settings.consumer_health_port,
            consumer.ready.is_set,
            stop,
        ),
        name="consumer-health",
    )
    # A health server that dies takes the consumer down with it: an
    # orchestrator that cannot probe the consumer would restart it anyway.
    health.add_done_callback(lambda _task: stop.set())
    try:
        await consumer.run(stop)
    finally:
        stop.set()
        await health


def main() -> int:
    load_env_file()
    try:
        settings = load_settings(ConsumerSettings)
    except SettingsError as exc:
        configure_logging()
        logger.error("settings_invalid", error=str(exc))
        return 2

    configure_logging(settings.log_level, settings.log_json)
    logger.info("consumer_starting", settings=repr(settings))
    try:
        registry = load_registry(settings.task_handler_modules)
        asyncio.run(_serve(settings, registry))
    except Exception:
        logger.exception("consumer_crashed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
