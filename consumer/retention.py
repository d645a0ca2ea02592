"""Inbox clean-up: the statement and schedule of the consumer's retention job.

An inbox row is what makes a second delivery of its message harmless, so it
has to outlive every possible delivery of that message id:

* redeliveries from the queue (a consumer died or shut down with the message
  un-acked) come within seconds to minutes;
* a second publication by the relay (it died after the broker's confirm but
  before marking the row) comes once the claim's lease runs out, or once the
  database is back if it was down;
* a dead letter is replayed by an operator, whenever they get to it.

``INBOX_RETENTION_HOURS`` (default 30 days) leaves weeks for the last. A
message that arrives after its inbox row is gone is treated as new: for a
task in a terminal status that changes nothing (terminal statuses are final),
but a stale work message for a task that is waiting for a retry would run an
extra attempt. Keep the retention well beyond any outage or dead-letter
backlog you could have. The job runs in every consumer, one at a time (an
advisory lock), every ``RETENTION_INTERVAL_SECONDS``.
"""

from __future__ import annotations

from consumer.settings import ConsumerSettings
from outbox_relay.retention import (
    INBOX_RETENTION_LOCK,
    RetentionSchedule,
    retention_schedule,
)

#: Delete up to ``$2`` inbox rows processed more than ``$1`` seconds ago.
DELETE_OLD_INBOX = """
DELETE FROM inbox
 WHERE message_id IN (
        SELECT message_id
          FROM inbox
         WHERE processed_at < now() - make_interval(secs => $1::float8)
         ORDER BY processed_at
         LIMIT $2::int
           FOR UPDATE SKIP LOCKED
       )
"""


def inbox_retention(settings: ConsumerSettings) -> RetentionSchedule | None:
    """The schedule that deletes old inbox rows; None when it is turned off."""
    return retention_schedule(
        name="inbox",
        database_url=settings.database_url,
        statement=DELETE_OLD_INBOX,
        retention_hours=settings.inbox_retention_hours,
        interval_seconds=settings.retention_interval_seconds,
        lock_key=INBOX_RETENTION_LOCK,
    )
