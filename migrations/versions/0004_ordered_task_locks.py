"""The NEW-to-PENDING trigger locks its tasks in id order.

The relay marks a whole batch published in one statement, and the trigger on
``outbox`` then moves every announced task from NEW to PENDING. The consumer
claims and completes tasks in batches too, and locks them in id order; a
trigger that updated its tasks in whatever order the join produced could hold
one task the consumer wants while waiting for another the consumer holds, a
deadlock PostgreSQL breaks only after ``deadlock_timeout``. Locking the tasks
in id order first, as the consumer does, makes every multi-task locker take
its locks in the same order, so they wait for each other instead.

The tasks are collected into an array first and looked up through their
primary key. A single locking query joining the trigger's transition tables
instead ran for tens of seconds under load (with the consumer changing the
same rows), stalling the relay.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The function as revision 0001 created it, restored on downgrade.
MARK_PENDING_0001 = """
CREATE OR REPLACE FUNCTION tasks_mark_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasks AS t
       SET status = 'PENDING', updated_at = now()
      FROM new_rows AS n
      JOIN old_rows AS o ON o.id = n.id
     WHERE n.routing_key = 'task.created'
       AND n.published_at IS NOT NULL
       AND o.published_at IS NULL
       AND t.id = CASE WHEN n.routing_key = 'task.created'
                       THEN n.correlation_id::uuid END
       AND t.status = 'NEW';
    RETURN NULL;
END $$
"""

MARK_PENDING_ORDERED = """
CREATE OR REPLACE FUNCTION tasks_mark_pending() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    announced uuid[];
BEGIN
    -- The service writes a task's id as its correlation id; a row written
    -- by hand may carry anything, and must not fail the relay's statement
    -- at the cast.
    SELECT array_agg(n.correlation_id::uuid)
      INTO announced
      FROM new_rows AS n
      JOIN old_rows AS o ON o.id = n.id
     WHERE n.routing_key = 'task.created'
       AND n.published_at IS NOT NULL
       AND o.published_at IS NULL
       AND n.correlation_id
           ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$';
    IF announced IS NULL THEN
        RETURN NULL;
    END IF;

    -- Lock first, in id order; the update then finds every row it changes
    -- already locked. Both look the tasks up through their primary key.
    PERFORM 1 FROM tasks
      WHERE id = ANY (announced) AND status = 'NEW'
      ORDER BY id
        FOR UPDATE;
    UPDATE tasks
       SET status = 'PENDING', updated_at = now()
     WHERE id = ANY (announced)
       AND status = 'NEW';
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.execute(MARK_PENDING_ORDERED)


def downgrade() -> None:
    op.execute(MARK_PENDING_0001)
