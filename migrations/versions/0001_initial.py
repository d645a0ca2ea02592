"""Tasks, outbox and inbox, with the triggers that tie them together.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "'NEW', 'PENDING', 'IN_PROGRESS', 'COMPLETED', 'FAILED', 'CANCELLED'"
PRIORITIES = "'LOW', 'MEDIUM', 'HIGH'"


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True),
        sa.Column("routing_key", sa.Text(), nullable=False),
        sa.Column("body", postgresql.JSONB(), nullable=False),
        sa.Column(
            "headers",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column(
            "available_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
    )
    op.create_index(
        "ix_outbox_pending",
        "outbox",
        ["available_at", "id"],
        postgresql_where=sa.text("published_at IS NULL AND dead_at IS NULL"),
    )
    op.create_index(
        "ix_outbox_published_at",
        "outbox",
        ["published_at"],
        postgresql_where=sa.text("published_at IS NOT NULL"),
    )
    op.create_index(
        "ix_outbox_dead_at",
        "outbox",
        ["dead_at"],
        postgresql_where=sa.text("dead_at IS NOT NULL"),
    )

    # One notification per inserting statement wakes every listening relay;
    # PostgreSQL delivers it only when the transaction commits.
    op.execute(
        """
        CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('outbox_pending', '');
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
        FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()
        """
    )

    op.create_table(
        "tasks",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("priority", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("result", postgresql.JSONB(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.CheckConstraint(f"status IN ({STATUSES})", name="ck_tasks_status"),
        sa.CheckConstraint(f"priority IN ({PRIORITIES})", name="ck_tasks_priority"),
        sa.CheckConstraint("max_attempts >= 1", name="ck_tasks_max_attempts"),
    )
    op.create_index("ix_tasks_created_at_id", "tasks", ["created_at", "id"])
    op.create_index(
        "ix_tasks_status_created_at_id", "tasks", ["status", "created_at", "id"]
    )

    # The relay stays ignorant of tasks: when it marks a task.created message
    # published, this trigger moves the task from NEW to PENDING. It runs once
    # per statement over the whole batch the relay marked.
    op.execute(
        """
        CREATE FUNCTION tasks_mark_pending() RETURNS trigger LANGUAGE plpgsql AS $$
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
    )
    op.execute(
        """
        CREATE TRIGGER tasks_mark_pending AFTER UPDATE ON outbox
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION tasks_mark_pending()
        """
    )

    op.create_table(
        "inbox",
        sa.Column("message_id", sa.Text(), primary_key=True),
        sa.Column("routing_key", sa.Text(), nullable=False),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("message_id", name="pk_inbox"),
    )
    op.create_index("ix_inbox_processed_at", "inbox", ["processed_at"])

    op.execute(
        """
        CREATE VIEW outbox_lag AS
        SELECT routing_key,
               count(*) AS pending,
               min(created_at) AS oldest_created_at,
               now() - min(created_at) AS oldest_age,
               max(attempts) AS max_attempts_so_far
          FROM outbox
         WHERE published_at IS NULL AND dead_at IS NULL
         GROUP BY routing_key
        """
    )
    op.execute(
        """
        CREATE VIEW outbox_dead AS
        SELECT id, routing_key, correlation_id, attempts, last_error,
               created_at, dead_at
          FROM outbox
         WHERE dead_at IS NOT NULL
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW outbox_dead")
    op.execute("DROP VIEW outbox_lag")
    op.drop_table("inbox")
    op.execute("DROP TRIGGER tasks_mark_pending ON outbox")
    op.execute("DROP FUNCTION tasks_mark_pending()")
    op.drop_table("tasks")
    op.execute("DROP TRIGGER outbox_notify ON outbox")
    op.execute("DROP FUNCTION outbox_notify()")
    op.drop_table("outbox")
