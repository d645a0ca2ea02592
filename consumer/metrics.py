"""Prometheus metrics of the consumer (served on CONSUMER_HEALTH_PORT at /metrics).

Counters are exposed with the ``_total`` suffix Prometheus adds. Labels take
values from small fixed sets (outcomes, registered task types, dead-letter
kinds), never from message content.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

#: A handler's run: milliseconds for the built-in types, up to the default
#: time limit of an hour.
HANDLER_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
    300, 900, 3600,
)  # fmt: skip

#: A task's whole life: from a fraction of a second to hours of back-off.
END_TO_END_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600,
    4 * 3600, 24 * 3600,
)  # fmt: skip

#: Deliveries in one batched statement, up to ``consumer.batching``'s limit.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

PROCESSED = Counter(
    "consumer_messages_processed",
    "Task messages handled, by outcome (completed, retry_scheduled, failed, ...).",
    ["outcome"],
)
DUPLICATES = Counter(
    "consumer_duplicates_skipped",
    "Deliveries skipped because their message id was already in the inbox,"
    " or because another delivery of the task is running it.",
)
DEAD_LETTERED = Counter(
    "consumer_dead_lettered",
    "Messages sent to the dead-letter queue, by reason (not_json, invalid_body,"
    " no_message_id, unknown_type, task_not_found).",
    ["reason"],
)
HANDLER_DURATION = Histogram(
    "consumer_handler_duration_seconds",
    "Time a handler ran for one attempt.",
    ["task_type"],
    buckets=HANDLER_BUCKETS,
)
END_TO_END = Histogram(
    "consumer_task_end_to_end_seconds",
    "From a task's creation to the terminal status this consumer recorded.",
    ["status"],
    buckets=END_TO_END_BUCKETS,
)
BATCH_SIZE = Histogram(
    "consumer_batch_deliveries",
    "Deliveries served by one batched statement, by step (claim, complete).",
    ["step"],
    buckets=BATCH_BUCKETS,
)
