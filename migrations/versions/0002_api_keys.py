"""API keys, task owners and idempotency keys.

Tasks that exist before this revision get the owner ``legacy``: no principal
created them, so only ``admin`` keys (or keys of a principal named
``legacy``) see them. The column keeps that value as its default, so a row
inserted by hand without an owner is hidden the same way.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCOPES = "'tasks:read', 'tasks:write', 'admin'"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("scopes", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name="pk_api_keys"),
        sa.CheckConstraint(
            f"cardinality(scopes) > 0 AND scopes <@ ARRAY[{SCOPES}]::text[]",
            name="ck_api_keys_scopes",
        ),
    )
    op.create_index("ix_api_keys_name", "api_keys", ["name"])

    # Existing rows take the default while the column is added, in one step.
    op.add_column(
        "tasks",
        sa.Column(
            "owner", sa.Text(), nullable=False, server_default=sa.text("'legacy'")
        ),
    )
    op.create_index(
        "ix_tasks_owner_created_at_id", "tasks", ["owner", "created_at", "id"]
    )

    op.create_table(
        "idempotency_keys",
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("owner", "key", name="pk_idempotency_keys"),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
            name="fk_idempotency_keys_task_id_tasks",
            deferrable=True,
            initially="DEFERRED",
        ),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_index("ix_tasks_owner_created_at_id", table_name="tasks")
    op.drop_column("tasks", "owner")
    op.drop_index("ix_api_keys_name", table_name="api_keys")
    op.drop_table("api_keys")
