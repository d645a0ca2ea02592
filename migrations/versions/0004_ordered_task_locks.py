"""The NEW-to-PENDING trigger locks its tasks in id order.

The relay marks a whole batch published in one statement, and the trigger on
``outbox`` then moves every announced task from NEW to PENDING. The consumer
claims and completes tasks in batches too, and locks them in id order; a
trigger that updated its tasks in whatever order the join produced could hold
one task the consumer wants while waiting for another the consumer holds, a
deadlock PostgreSQL breaks only after ``deadlock_timeout``. Locking the tasks
in id order first, as the consumer does, makes every multi-task locker take
its locks in the same order, so they wait for each other instead.

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
BEGIN
    WITH announced AS (
        -- The CASE keeps other routing keys' correlation ids (not always
        -- UUIDs) away from the cast.
        SELECT CASE WHEN n.routing_key = 'task.created'
                    THEN n.correlation_id::uuid END AS task_id
          FROM new_rows AS n
          JOIN old_rows AS o ON o.id = n.id
         WHERE n.routing_key = 'task.created'
           AND n.published_at IS NOT NULL
           AND o.published_at IS NULL
    ),
    locked AS MATERIALIZED (
        SELECT id FROM tasks
         WHERE id IN (SELECT task_id FROM announced)
           AND status = 'NEW'
         ORDER BY id
           FOR UPDATE
    )
    UPDATE tasks AS t
       SET status = 'PENDING', updated_at = now()
      FROM locked
     WHERE t.id = locked.id
       AND t.status = 'NEW';
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.execute(MARK_PENDING_ORDERED)


def downgrade() -> None:
    op.execute(MARK_PENDING_0001)
