"""Settings of the API process, read once at start-up (see outbox_relay.config)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from outbox_relay.config import LogLevel, Port, mask_url
from service.schemas import MaxAttempts

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/outbox_tasks"

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class DatabaseSettings(msgspec.Struct, kw_only=True):
    """Just the database, for tools such as Alembic that need nothing else."""

    database_url: str = DEFAULT_DATABASE_URL

    def __repr__(self) -> str:
        return f"DatabaseSettings(database_url={mask_url(self.database_url)!r})"


class ServiceSettings(msgspec.Struct, kw_only=True):
    #: PostgreSQL, as ``postgresql://user:password@host:port/database``.
    database_url: str = DEFAULT_DATABASE_URL
    #: Interface and port the API listens on.
    api_host: str = "127.0.0.1"
    api_port: Port = 8000
    #: Requests with a larger body are refused with 413.
    api_max_body_bytes: Positive = 1024 * 1024
    #: A task payload larger than this, encoded as JSON, is refused with 422.
    api_max_payload_bytes: Positive = 64 * 1024
    #: A task payload nested deeper than this (objects and arrays) gets 422.
    api_max_payload_depth: Positive = 32
    #: Requests each principal may make per minute; 0 turns the limit off.
    api_rate_limit_per_minute: NonNegative = 600
    #: Seconds a checked key's principal is remembered; every change to the
    #: keys empties the cache at once (see ``service.key_cache``). 0: none.
    api_key_cache_seconds: NonNegative = 30
    #: Seconds an ``Idempotency-Key`` keeps answering with its first task.
    api_idempotency_ttl_seconds: Positive = 24 * 60 * 60
    #: Redis that holds the rate limit counters, shared by every API replica.
    rate_limit_storage_url: str = "redis://127.0.0.1:6379/0"
    #: Start of every rate limit key, so deployments can share one Redis.
    rate_limit_key_prefix: str = "outbox-tasks"
    #: Connections in each of the API's two pools (see ``service.database``);
    #: requests beyond them wait.
    db_pool_size: Positive = 10
    #: Type used when a submitted task names none; the API refuses to start
    #: when no handler of that name is registered.
    default_task_type: str = "checksum"
    #: Attempts a task gets when it does not say; the range a request may ask.
    default_max_attempts: MaxAttempts = 3
    #: Comma-separated modules that register extra task handlers on import.
    task_handler_modules: str = ""
    #: Export the API's spans over OTLP (see ``service.tracing``); also on
    #: whenever ``otel_exporter_otlp_endpoint`` is set.
    otel_enabled: bool = False
    #: The standard OpenTelemetry variable; the exporter reads it (and the
    #: other ``OTEL_EXPORTER_OTLP_*`` variables) itself.
    otel_exporter_otlp_endpoint: str = ""
    log_level: LogLevel = "INFO"
    #: JSON log lines; unset means JSON unless standard error is a terminal.
    log_json: bool | None = None

    def __post_init__(self) -> None:
        check_redis_url(self.rate_limit_storage_url)

    def __repr__(self) -> str:
        return (
            f"ServiceSettings(database_url={mask_url(self.database_url)!r}, "
            f"api_host={self.api_host!r}, api_port={self.api_port}, "
            f"rate_limit_storage_url={mask_url(self.rate_limit_storage_url)!r})"
        )


def check_redis_url(url: str) -> None:
    """ValueError unless ``RATE_LIMIT_STORAGE_URL`` is a Redis URL."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in {"redis", "rediss"}:
        raise ValueError("RATE_LIMIT_STORAGE_URL must be a redis:// or rediss:// URL")
