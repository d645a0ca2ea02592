"""Prometheus metrics of the consumer (served on CONSUMER_HEALTH_PORT at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from outbox_relay.metrics import LATENCY_BUCKETS

PROCESSED = Counter(
    "consumer_messages_processed",
    "Task messages handled, by outcome (completed, retry_scheduled, failed, ...).",
    ["outcome"],
)
DUPLICATES = Counter(
    "consumer_duplicates_skipped",
    "Deliveries skipped because their message id was already in the inbox.",
)
DEAD_LETTERED = Counter(
    "consumer_dead_lettered",
    "Messages sent to the dead-letter queue, by reason.",
    ["reason"],
)
HANDLER_DURATION = Histogram(
    "consumer_handler_duration_seconds",
    "Time a handler ran for one attempt.",
    ["task_type"],
    buckets=LATENCY_BUCKETS,
)
END_TO_END = Histogram(
    "consumer_task_end_to_end_seconds",
    "From a task's creation to its terminal status.",
    ["status"],
    buckets=LATENCY_BUCKETS,
)
