"""The statements on the API's hot path, named and described in one place.

Every request under ``/api/v1`` checks its key, and most of them submit a
task, so those two run as plain SQL on the driver's connection (see
:func:`service.database.driver_connection`) instead of through SQLAlchemy's
statement building; the rest of the API uses SQLAlchemy Core. Parameters are
positional (asyncpg's ``$n``); JSON goes in as text and is cast in SQL.
"""

from __future__ import annotations

#: The live key with id ``$1``: its principal, scopes and stored hash.
AUTHENTICATE = """
SELECT name, scopes, key_hash
  FROM api_keys
 WHERE key_id = $1::text
   AND revoked_at IS NULL
"""

#: Insert a NEW task and the outbox row announcing it, in one statement: both
#: rows or neither, in one round trip and with no explicit transaction.
#: PostgreSQL runs every data-modifying part of a WITH exactly once, whether or
#: not the final SELECT reads it. Returns the task's ``created_at`` and
#: ``updated_at``; every other column is what the caller passed or a known
#: default.
#:
#: ``$1`` id, ``$2`` owner, ``$3`` title, ``$4`` description, ``$5`` type,
#: ``$6`` payload (JSON), ``$7`` priority, ``$8`` max_attempts, ``$9`` run_at,
#: ``$10`` trace_headers (JSON); then the outbox row: ``$11`` routing key,
#: ``$12`` body (JSON), ``$13`` headers (JSON), ``$14`` correlation id,
#: ``$15`` available_at (NULL: now).
SUBMIT_TASK = """
WITH task AS (
    INSERT INTO tasks (id, owner, title, description, type, payload, priority,
                       status, max_attempts, run_at, trace_headers)
    VALUES ($1::uuid, $2::text, $3::text, $4::text, $5::text, $6::text::jsonb,
            $7::text, 'NEW', $8::int, $9::timestamptz, $10::text::jsonb)
    RETURNING created_at, updated_at
),
announcement AS (
    INSERT INTO outbox (routing_key, body, headers, correlation_id, available_at)
    VALUES ($11::text, $12::text::jsonb, $13::text::jsonb, $14::text,
            coalesce($15::timestamptz, now()))
)
SELECT created_at, updated_at FROM task
"""

#: Claim idempotency key ``$2`` of owner ``$1`` for request hash ``$3`` and
#: task ``$4``, or take it over if its row is older than ``$5`` seconds.
#: Returns a row when the key is now ours; none when a live row holds it. A
#: concurrent claim of the same key waits on the unique index until the other
#: transaction ends, so of racing submissions exactly one gets a row back.
CLAIM_IDEMPOTENCY_KEY = """
INSERT INTO idempotency_keys AS k (owner, key, request_hash, task_id)
VALUES ($1::text, $2::text, $3::text, $4::uuid)
ON CONFLICT (owner, key) DO UPDATE
   SET request_hash = excluded.request_hash,
       task_id = excluded.task_id,
       created_at = now()
 WHERE k.created_at <= now() - make_interval(secs => $5::int)
RETURNING 1
"""

#: The request hash and task of a live idempotency key (``$1`` owner, ``$2``
#: key), read after :data:`CLAIM_IDEMPOTENCY_KEY` found it taken.
IDEMPOTENCY_KEY_HOLDER = """
SELECT request_hash, task_id
  FROM idempotency_keys
 WHERE owner = $1::text
   AND key = $2::text
"""

#: Every statement above by name, for the test that prepares each one against
#: the migrated schema.
ALL: dict[str, str] = {
    "AUTHENTICATE": AUTHENTICATE,
    "SUBMIT_TASK": SUBMIT_TASK,
    "CLAIM_IDEMPOTENCY_KEY": CLAIM_IDEMPOTENCY_KEY,
    "IDEMPOTENCY_KEY_HOLDER": IDEMPOTENCY_KEY_HOLDER,
}
