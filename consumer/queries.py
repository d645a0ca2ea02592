"""Every SQL statement the consumer runs, named and described in one place.

An attempt is two short transactions around the handler, never one long one:
the first claims the task (``LOCK_TASK``, which also reads the inbox, then
``START_ATTEMPT``), the second
records the outcome (``LOCK_TASK``, ``RECORD_INBOX``, then one of
``COMPLETE_TASK``, ``FAIL_TASK`` or ``SCHEDULE_RETRY``). Both lock the task row
before touching the inbox, so two deliveries of one message serialise on the
task and never deadlock.

Most deliveries take the common path: a task ready to run, whose handler
succeeds. For that path :data:`CLAIM_READY_TASKS` and
:data:`RECORD_COMPLETIONS` do each transaction's work in a single statement,
for many concurrent deliveries at once (see :mod:`consumer.batching`), run as
plain SQL on the driver's connection; whatever they do not cover falls back to
the statements above. They keep the same order: task rows first (in id
order), inbox second.
"""

from __future__ import annotations

from sqlalchemy import Float, Integer, Text, TextClause, Uuid, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

#: The task as the attempt needs it, locked until the transaction ends, with
#: the database's clock (``now``) so retry times do not depend on ours,
#: ``created_at`` for the end-to-end latency of the task, and ``seen``: whether
#: the message's effect is already committed (its inbox row exists). ``seen``
#: is a plain read: the outcome transaction re-checks by inserting, so a race
#: between two deliveries only costs a second handler run, never a second
#: effect. One statement for both saves a round trip on every message.
LOCK_TASK = text(
    """
    SELECT id, type, payload, status, attempts, max_attempts, created_at,
           now() AS now,
           EXISTS (SELECT 1 FROM inbox WHERE message_id = :message_id) AS seen
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

#: Hand back an attempt that shutdown cut short: the task waits again and the
#: attempt does not count. Matches only while the task is still in attempt
#: ``:attempt``, so a claim by another delivery since is never undone.
RELEASE_ATTEMPT = text(
    """
    UPDATE tasks
       SET status = 'PENDING',
           attempts = attempts - 1,
           updated_at = now()
     WHERE id = :task_id
       AND status = 'IN_PROGRESS'
       AND attempts = :attempt
    """
)

#: One sweep for stuck tasks: IN_PROGRESS for longer than their time limit
#: plus ``:grace`` seconds, so their consumer died or hung and no delivery is
#: going to finish them. The limit is the type's own (``:type_names`` and
#: ``:type_limits``, parallel arrays) or ``:default_limit``.
#:
#: In the same statement, each stuck task is either retried (PENDING plus a
#: ``task.retry`` outbox row, due at once) while attempts remain, or failed
#: (FAILED plus a ``task.failed`` event). The outbox rows carry the same bodies
#: the consumer writes through ``enqueue``; their headers are the task's
#: ``trace_headers`` (the request id and trace context of the request that
#: created or last retried it), since no delivery is at hand to copy them
#: from. ``FOR UPDATE SKIP LOCKED`` lets
#: every consumer sweep at once, each taking different tasks and none waiting
#: on a task a delivery is recording. At most ``:batch_size`` tasks per sweep,
#: oldest first. Returns each swept task with its new status.
SWEEP_STUCK_TASKS = text(
    """
    WITH limits AS (
        SELECT type_name, seconds
          FROM unnest(CAST(:type_names AS text[]), CAST(:type_limits AS float8[]))
               AS l(type_name, seconds)
    ),
    stuck AS (
        SELECT t.id, t.type, t.attempts, t.max_attempts,
               coalesce(l.seconds, :default_limit) AS time_limit
          FROM tasks AS t
          LEFT JOIN limits AS l ON l.type_name = t.type
         WHERE t.status = 'IN_PROGRESS'
           AND t.started_at < now() - make_interval(
                   secs => coalesce(l.seconds, :default_limit) + :grace)
         ORDER BY t.started_at
         LIMIT :batch_size
           FOR UPDATE OF t SKIP LOCKED
    ),
    swept AS (
        UPDATE tasks AS t
           SET status = CASE WHEN s.attempts >= s.max_attempts
                             THEN 'FAILED' ELSE 'PENDING' END,
               error = format(
                   'attempt %s exceeded its time limit of %s s;'
                   ' its consumer stopped or hung', s.attempts, s.time_limit),
               completed_at = CASE WHEN s.attempts >= s.max_attempts
                                   THEN now() END,
               updated_at = now()
          FROM stuck AS s
         WHERE t.id = s.id
        RETURNING t.id, t.type, t.status, t.attempts, t.trace_headers
    ),
    events AS (
        INSERT INTO outbox (routing_key, body, correlation_id, headers)
        SELECT CASE WHEN status = 'FAILED' THEN 'task.failed' ELSE 'task.retry' END,
               CASE WHEN status = 'FAILED'
                    THEN jsonb_build_object('task_id', id::text, 'type', type,
                                            'status', status, 'attempts', attempts)
                    ELSE jsonb_build_object('task_id', id::text, 'type', type)
               END,
               id::text,
               trace_headers
          FROM swept
        RETURNING id
    )
    SELECT id, type, status, attempts FROM swept
    """
).bindparams(
    bindparam("type_names", type_=ARRAY(Text())),
    bindparam("type_limits", type_=ARRAY(Float())),
    bindparam("default_limit", type_=Float()),
    bindparam("grace", type_=Float()),
    bindparam("batch_size", type_=Integer()),
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

#: Messages whose effect was committed, per minute of the last hour, newest
#: first, from the ``inbox_throughput`` view (a range scan of
#: ``ix_inbox_processed_at``), for ``python -m consumer status``.
INBOX_THROUGHPUT = text(
    """
    SELECT minute, processed, per_second FROM inbox_throughput
    """
)

#: The common claim, for a batch of deliveries in one statement: start the
#: next attempt of each task of ``$1`` (task ids) whose message in ``$2``
#: (message ids, in the same order) has no inbox row, if the task is ready to
#: run and of a type this consumer knows (``$4``, an array of names). Ready
#: means NEW or PENDING, or IN_PROGRESS with attempts left when the delivery
#: is a redelivery (``$3``, in the same order as ``$1``): the broker gave the
#: message back because the consumer running it died. Returns one row per
#: claimed task, with what the attempt needs; a delivery without a row goes
#: through :data:`LOCK_TASK` in a transaction of its own, which decides the
#: rest (duplicate, finished, a copy of a running message, interrupted for
#: the last time, unknown type, or gone). No two deliveries of a batch share a
#: task or a message id (see :mod:`consumer.batching`).
#:
#: The tasks are locked in id order first, so two batches that share a task
#: (a redelivery in another consumer) wait for each other instead of
#: deadlocking. The UPDATE re-checks the status on each row's newest version;
#: the inbox check is a plain read, as in :data:`LOCK_TASK`.
CLAIM_READY_TASKS = """
WITH wanted AS MATERIALIZED (
    SELECT *
      FROM unnest($1::uuid[], $2::text[], $3::bool[])
           AS w(task_id, message_id, redelivered)
),
locked AS MATERIALIZED (
    SELECT id FROM tasks
     WHERE id IN (SELECT task_id FROM wanted)
     ORDER BY id
       FOR UPDATE
)
UPDATE tasks AS t
   SET status = 'IN_PROGRESS',
       attempts = t.attempts + 1,
       started_at = now(),
       updated_at = now()
  FROM locked
  JOIN wanted ON wanted.task_id = locked.id
 WHERE t.id = locked.id
   AND t.type = ANY($4::text[])
   AND (t.status IN ('NEW', 'PENDING')
        OR (t.status = 'IN_PROGRESS' AND wanted.redelivered
            AND t.attempts < t.max_attempts))
   AND NOT EXISTS (SELECT 1 FROM inbox WHERE message_id = wanted.message_id)
RETURNING wanted.message_id, t.type, t.payload, t.attempts, t.max_attempts,
          t.created_at
"""

#: The common outcome, for a batch of deliveries in one statement: lock the
#: tasks (in id order, as above), insert each delivery's inbox row, and only
#: where that insert won and the task is not terminal, complete the task and
#: write its ``task.completed`` event. All of it or nothing, in one round trip
#: and without an explicit transaction. Parallel arrays, one entry per
#: delivery: ``$1`` task id, ``$2`` message id, ``$3`` routing key, ``$4``
#: result (JSON), ``$5`` the event's body (JSON, whose ``attempts`` is set
#: here from the row), ``$6`` its headers (JSON), ``$7`` its correlation id.
#:
#: The task rows are locked before the inbox is touched, as everywhere else.
#: Returns, per delivery whose task exists, its message id, the task's status
#: as locked (before this statement changed it) and whether the inbox row is
#: this delivery's. Tasks whose type has a recorder, and failed attempts, are
#: recorded by the statements above.
RECORD_COMPLETIONS = """
WITH done AS MATERIALIZED (
    SELECT *
      FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                  $6::text[], $7::text[])
           AS d(task_id, message_id, routing_key, result, body, headers,
                correlation_id)
),
locked AS MATERIALIZED (
    SELECT id, status FROM tasks
     WHERE id IN (SELECT task_id FROM done)
     ORDER BY id
       FOR UPDATE
),
recorded AS (
    INSERT INTO inbox (message_id, routing_key)
    SELECT done.message_id, done.routing_key
      FROM done
      JOIN locked ON locked.id = done.task_id
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
),
completed AS (
    UPDATE tasks AS t
       SET status = 'COMPLETED',
           result = done.result::jsonb,
           error = NULL,
           completed_at = now(),
           updated_at = now()
      FROM locked
      JOIN done ON done.task_id = locked.id
     WHERE t.id = locked.id
       AND locked.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')
       AND done.message_id IN (SELECT message_id FROM recorded)
    RETURNING t.attempts, done.body, done.headers, done.correlation_id
),
announced AS (
    INSERT INTO outbox (routing_key, body, headers, correlation_id)
    SELECT 'task.completed',
           jsonb_set(body::jsonb, '{attempts}', to_jsonb(attempts)),
           headers::jsonb, correlation_id
      FROM completed
)
SELECT done.message_id, locked.status,
       done.message_id IN (SELECT message_id FROM recorded) AS recorded
  FROM done
  JOIN locked ON locked.id = done.task_id
"""

#: Every statement above by name, for the test that prepares each one against
#: the migrated schema.
ALL: dict[str, TextClause | str] = {
    "LOCK_TASK": LOCK_TASK,
    "START_ATTEMPT": START_ATTEMPT,
    "RECORD_INBOX": RECORD_INBOX,
    "COMPLETE_TASK": COMPLETE_TASK,
    "FAIL_TASK": FAIL_TASK,
    "SCHEDULE_RETRY": SCHEDULE_RETRY,
    "RELEASE_ATTEMPT": RELEASE_ATTEMPT,
    "SWEEP_STUCK_TASKS": SWEEP_STUCK_TASKS,
    "CANCELLED_AMONG": CANCELLED_AMONG,
    "INBOX_THROUGHPUT": INBOX_THROUGHPUT,
    "CLAIM_READY_TASKS": CLAIM_READY_TASKS,
    "RECORD_COMPLETIONS": RECORD_COMPLETIONS,
}
