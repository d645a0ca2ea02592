"""Inbox clean-up: the statement the consumer's retention job runs.

An inbox row only has to outlive every possible redelivery of its message.
Deliveries come from the queue (un-acked messages come back within the
consumer's shutdown grace or a connection timeout), from a scheduled retry
(at most ``RETRY_BACKOFF_MAX_SECONDS`` later) and from a dead-letter replay,
which an operator runs by hand; the default retention leaves weeks for that.
Even past it, a late message cannot apply a task twice: the consumer never
changes a task in a terminal status.
"""

from __future__ import annotations

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
