"""Settings of the consumer process, read once at start-up (see outbox_relay.config)."""

from __future__ import annotations

import msgspec

from outbox_relay.config import LogLevel, Port, mask_url
from service.settings import DEFAULT_DATABASE_URL

#: Prefetch when ``CONSUMER_PREFETCH`` is not set. Deliveries that arrive
#: together share the consumer's batched statements, so a larger window
#: makes larger batches: at 64 the consumer processes about a third more
#: messages per second than at 32 (``bench/run --only stages``).
DEFAULT_PREFETCH = 64


class ConsumerSettings(msgspec.Struct, kw_only=True):
    #: PostgreSQL, as ``postgresql://user:password@host:port/database``.
    database_url: str = DEFAULT_DATABASE_URL
    #: RabbitMQ, as ``amqp://user:password@host:port/vhost``.
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: Start of every exchange and queue name, so deployments can share a broker.
    amqp_prefix: str = "tasks"
    #: Unacknowledged messages the broker hands this process at once; also how
    #: many tasks it runs concurrently.
    consumer_prefetch: int = DEFAULT_PREFETCH
    #: Deliveries of one message before the broker dead-letters it (the work
    #: queue's ``x-delivery-limit``); must match across consumers.
    consumer_delivery_limit: int = 5
    #: Cap of the lifecycle-event queue; the oldest events are dropped beyond it.
    task_events_max_length: int = 100_000
    #: Comma-separated modules that register extra task handlers on import.
    task_handler_modules: str = ""
    #: Seconds between checks whether a running task was cancelled.
    consumer_cancel_poll_interval: float = 1.0
    #: Seconds running tasks get to finish after SIGTERM before they are
    #: cancelled and their messages left for redelivery.
    consumer_shutdown_grace_seconds: float = 30.0
    #: First retry delay; each further attempt doubles it (with full jitter).
    retry_backoff_base_seconds: float = 2.0
    #: Upper bound of a retry delay, before jitter.
    retry_backoff_max_seconds: float = 300.0
    #: Seconds an attempt of a task type without its own ``timeout`` may run;
    #: the handler is cancelled (a failed attempt) beyond it.
    task_time_limit_seconds: float = 3600.0
    #: Extra seconds past a task's time limit before the sweeper calls an
    #: IN_PROGRESS task stuck and retries or fails it.
    task_time_limit_grace_seconds: float = 60.0
    #: Seconds between two sweeps for stuck tasks.
    task_sweep_interval_seconds: float = 30.0
    #: Hours an inbox row is kept before the retention job deletes it; 0
    #: keeps them for ever. It must outlast every redelivery of the message
    #: the row stands for (see ``consumer.retention``).
    inbox_retention_hours: float = 720.0
    #: Seconds between two runs of the retention job; 0 runs none. With
    #: several consumers, one of them cleans at a time (an advisory lock).
    retention_interval_seconds: float = 300.0
    #: Export the consumer's spans over OTLP (see ``service.tracing``); also on
    #: whenever ``otel_exporter_otlp_endpoint`` is set.
    otel_enabled: bool = False
    #: The standard OpenTelemetry variable; the exporter reads it (and the
    #: other ``OTEL_EXPORTER_OTLP_*`` variables) itself.
    otel_exporter_otlp_endpoint: str = ""
    #: Interface of the health and metrics server (/health/live, /health/ready,
    #: /metrics).
    consumer_health_host: str = "127.0.0.1"
    #: Port of that server; 0 (the default) runs none.
    consumer_health_port: Port = 0
    #: Threshold of the process's log output (DEBUG, INFO, WARNING, ...).
    log_level: LogLevel = "INFO"
    #: JSON log lines; unset means JSON unless standard error is a terminal.
    log_json: bool | None = None

    def __post_init__(self) -> None:
        if self.consumer_prefetch < 1:
            raise ValueError("consumer_prefetch must be at least 1")
        if self.consumer_delivery_limit < 1:
            raise ValueError("consumer_delivery_limit must be at least 1")
        if self.consumer_cancel_poll_interval <= 0:
            raise ValueError("consumer_cancel_poll_interval must be positive")
        if self.consumer_shutdown_grace_seconds < 0:
            raise ValueError("consumer_shutdown_grace_seconds must not be negative")
        if self.retry_backoff_base_seconds < 0 or self.retry_backoff_max_seconds < 0:
            raise ValueError("retry back-off seconds must not be negative")
        if self.task_time_limit_seconds <= 0:
            raise ValueError("task_time_limit_seconds must be positive")
        if self.task_time_limit_grace_seconds < 0:
            raise ValueError("task_time_limit_grace_seconds must not be negative")
        if self.task_sweep_interval_seconds <= 0:
            raise ValueError("task_sweep_interval_seconds must be positive")
        if self.retention_interval_seconds < 0:
            raise ValueError("retention_interval_seconds must not be negative")
        if self.inbox_retention_hours < 0:
            raise ValueError("inbox_retention_hours must not be negative")
        # Inbox rows must outlive every redelivery; a retention shorter than
        # one retry back-off is certainly a mistake (hours taken for seconds).
        if 0 < self.inbox_retention_hours * 3600 <= self.retry_backoff_max_seconds:
            raise ValueError(
                "inbox_retention_hours must be longer than retry_backoff_max_seconds"
            )

    def __repr__(self) -> str:
        return (
            f"ConsumerSettings(database_url={mask_url(self.database_url)!r}, "
            f"amqp_url={mask_url(self.amqp_url)!r}, "
            f"amqp_prefix={self.amqp_prefix!r}, "
            f"consumer_prefetch={self.consumer_prefetch})"
        )
