"""Settings of the relay process, read once at start-up (see outbox_relay.config)."""

from __future__ import annotations

import os
import socket
from typing import Annotated

import msgspec

from outbox_relay.config import LogLevel, Port, mask_url

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]


def _default_relay_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RelaySettings(msgspec.Struct, kw_only=True):
    """Everything ``python -m outbox_relay`` reads from its environment."""

    #: PostgreSQL, as ``postgresql://user:password@host:port/database``.
    database_url: str = "postgresql://postgres@127.0.0.1:5432/outbox_tasks"
    #: RabbitMQ, as ``amqp://user:password@host:port/vhost``.
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: Start of every exchange and queue name, so deployments can share a broker.
    amqp_prefix: str = "tasks"
    #: Rows claimed, published and marked together; a full batch loops at once.
    relay_batch_size: AtLeastOne = 1024
    #: Seconds between polls when no notification arrives: the upper bound on
    #: how late a row is picked up if a NOTIFY is lost or LISTEN is down.
    relay_poll_interval: Positive = 1.0
    #: Seconds one batch may wait for the broker's confirms before its
    #: unconfirmed rows count as failed.
    relay_publish_timeout: Positive = 10.0
    #: Seconds a claimed row stays invisible to other relays; if this relay dies
    #: mid-batch its rows are picked up again after this long.
    relay_lease_seconds: Positive = 60.0
    #: Failed publications before a row is parked with ``dead_at`` set.
    relay_max_attempts: AtLeastOne = 25
    #: Back-off after a row's first failure; it doubles with each attempt.
    relay_retry_base_seconds: Positive = 1.0
    #: Longest back-off between two attempts at the same row.
    relay_retry_max_seconds: Positive = 300.0
    #: Largest message body published; a larger row fails (and is parked after
    #: ``relay_max_attempts``) instead of reaching the broker. Keep it below
    #: the broker's ``max_message_size`` (128 MiB by default in RabbitMQ).
    relay_max_message_bytes: AtLeastOne = 16 * 1024 * 1024
    #: Written to ``claimed_by`` and the connection names; unique per process.
    relay_name: str = msgspec.field(default_factory=_default_relay_name)
    #: Seconds between two samples of the backlog for the ``outbox_pending_rows``
    #: and ``outbox_oldest_pending_age_seconds`` gauges (one cheap query each).
    relay_lag_sample_seconds: Positive = 5.0
    #: Hours a published row is kept before the retention job deletes it;
    #: 0 keeps published rows for ever. Unpublished and parked rows are never
    #: deleted.
    outbox_retention_hours: NonNegative = 168.0
    #: Seconds between two runs of the retention job; 0 runs none. With
    #: several relays, one of them cleans at a time (an advisory lock).
    retention_interval_seconds: NonNegative = 300.0
    #: Interface of the relay's /health/live, /health/ready and /metrics.
    relay_health_host: str = "127.0.0.1"
    #: Port of those endpoints; 0 (the default outside containers) serves none.
    relay_health_port: Port = 0
    #: Minimum level of the log lines printed.
    log_level: LogLevel = "INFO"
    #: JSON log lines; unset means JSON unless standard error is a terminal.
    log_json: bool | None = None

    def __post_init__(self) -> None:
        # A lease shorter than the confirm wait would let a second relay claim
        # rows that are still in flight here, publishing them twice.
        if self.relay_lease_seconds <= self.relay_publish_timeout:
            raise ValueError(
                "relay_lease_seconds must be longer than relay_publish_timeout"
            )
        if self.relay_retry_max_seconds < self.relay_retry_base_seconds:
            raise ValueError(
                "relay_retry_max_seconds must be at least relay_retry_base_seconds"
            )

    def __repr__(self) -> str:
        return (
            f"RelaySettings(database_url={mask_url(self.database_url)!r}, "
            f"amqp_url={mask_url(self.amqp_url)!r}, "
            f"amqp_prefix={self.amqp_prefix!r}, "
            f"relay_name={self.relay_name!r}, "
            f"relay_batch_size={self.relay_batch_size})"
        )
