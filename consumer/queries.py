"""Every SQL statement the consumer runs, named and described in one place.

An attempt is two short transactions around the handler, never one long one:
the first claims the task (``LOCK_TASK`` then ``START_ATTEMPT``), the second
records the outcome (``LOCK_TASK``, ``RECORD_INBOX``, then one of
``COMPLETE_TASK``, ``FAIL_TASK`` or ``SCHEDULE_RETRY``). Both lock the task row
before touching the inbox, so two deliveries of one message serialise on the
task and never deadlock.
"""

from __future__ import annotations

from sqlalchemy import TextClause, Uuid, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

#: Whether a message's effect is already committed. A plain read: the outcome
#: transaction re-checks by inserting, so a race between two deliveries only
#: costs a second handler run, never a second effect.
INBOX_CONTAINS = text(
    """
    SELECT 1 FROM inbox WHERE message_id = :message_id
    """
)

#: The task as the attempt needs it, locked until the transaction ends, with
#: the database's clock (``now``) so retry times do not depend on ours.
LOCK_TASK = text(
    """
    SELECT id, type, payload, status, attempts, max_attempts, now() AS now
      FROM tasks
     WHERE id = :task_id
       FOR UPDATE
    """
)

#: Claim the task for one more attempt; returns the attempt's number.
START_ATTEMPT = text(
    """
    UPDATE tasks
       SET status = 'IN_PROGRESS',
           attempts = attempts + 1,
           started_at = now(),
           updated_at = now()
     WHERE id = :task_id
    RETURNING attempts
    """
)

#: Mark a message's effect as committed. Returns no row when another delivery
#: of the same message got there first; that delivery's outcome stands.
RECORD_INBOX = text(
    """
    INSERT INTO inbox (message_id, routing_key)
    VALUES (:message_id, :routing_key)
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
    """
)

#: The handler succeeded: store its result and clear an earlier attempt's error.
COMPLETE_TASK = text(
    """
    UPDATE tasks
       SET status = 'COMPLETED',
           result = :result,
           error = NULL,
           completed_at = now(),
           updated_at = now()
     WHERE id = :task_id
    """
).bindparams(bindparam("result", type_=JSONB))

#: The task failed for good: out of attempts or a non-retryable error.
FAIL_TASK = text(
    """
    UPDATE tasks
       SET status = 'FAILED',
           error = :error,
           completed_at = now(),
           updated_at = now()
     WHERE id = :task_id
    """
)

#: The attempt failed but another is allowed: the task waits for the
#: ``task.retry`` message written in the same transaction.
SCHEDULE_RETRY = text(
    """
    UPDATE tasks
       SET status = 'PENDING',
           error = :error,
           updated_at = now()
     WHERE id = :task_id
    """
)

#: Which of the running tasks were cancelled meanwhile; one query for every
#: task this process is running, whatever their number.
CANCELLED_AMONG = text(
    """
    SELECT id FROM tasks
     WHERE id = ANY(:task_ids)
       AND status = 'CANCELLED'
    """
).bindparams(bindparam("task_ids", type_=ARRAY(Uuid())))

#: Every statement above by name, for the test that prepares each one against
#: the migrated schema.
ALL: dict[str, TextClause] = {
    "INBOX_CONTAINS": INBOX_CONTAINS,
    "LOCK_TASK": LOCK_TASK,
    "START_ATTEMPT": START_ATTEMPT,
    "RECORD_INBOX": RECORD_INBOX,
    "COMPLETE_TASK": COMPLETE_TASK,
    "FAIL_TASK": FAIL_TASK,
    "SCHEDULE_RETRY": SCHEDULE_RETRY,
    "CANCELLED_AMONG": CANCELLED_AMONG,
}
