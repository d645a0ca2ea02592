"""Prometheus metrics of the relay (served on RELAY_HEALTH_PORT at /metrics).

Counters are exposed with the ``_total`` suffix Prometheus adds. The relay
counts a batch once its outcome is written to the outbox (see
:meth:`outbox_relay.relay.OutboxRelay._settle`); the two gauges are sampled
every ``RELAY_LAG_SAMPLE_SECONDS`` by every relay, so aggregate them with
``max``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Latency buckets from a few milliseconds (a NOTIFY wake-up) to minutes (an
#: outage or a scheduled retry).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip

PUBLISHED = Counter(
    "outbox_relay_published",
    "Outbox rows the broker confirmed.",
    ["routing_key"],
)
RETURNED = Counter(
    "outbox_relay_returned",
    "Messages the broker returned as unroutable.",
    ["routing_key"],
)
FAILED = Counter(
    "outbox_relay_publish_failures",
    "Failed publications of a row, by reason (returned, nacked, timeout,"
    " oversize, invalid_headers, channel_closed).",
    ["reason"],
)
DEAD = Counter(
    "outbox_relay_rows_dead",
    "Rows parked as dead after too many failed publications.",
)
PUBLISH_LATENCY = Histogram(
    "outbox_relay_publish_latency_seconds",
    "From a row's creation to the broker's confirm.",
    buckets=LATENCY_BUCKETS,
)
BATCH_DURATION = Histogram(
    "outbox_relay_batch_duration_seconds",
    "Claim, publish and settle of one batch.",
    buckets=LATENCY_BUCKETS,
)
PENDING = Gauge(
    "outbox_pending_rows",
    "Unpublished, live outbox rows (as last sampled by this relay).",
)
OLDEST_PENDING_AGE = Gauge(
    "outbox_oldest_pending_age_seconds",
    "Age of the oldest unpublished, live outbox row; 0 when there is none.",
)
LONGEST_DUE = Gauge(
    "outbox_longest_due_seconds",
    "How long the unpublished row due the longest has been due (rows scheduled"
    " for later do not count); 0 when none is due.",
)
