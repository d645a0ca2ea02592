"""The NEW-to-PENDING trigger joins its transition tables by hash.

The trigger on ``outbox`` finds the rows a statement published by joining the
statement's old and new rows on ``id``. Transition tables carry no
statistics, so the planner guessed a row or two on each side and joined them
in a nested loop: for a batch of 1,024 rows, a million comparisons and more
than a hundred milliseconds per mark-published, longer than publishing the
batch took. With nested loops off inside the function (its own setting, no
other statement sees it) the join is a hash join, linear in the batch.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER FUNCTION tasks_mark_pending() SET enable_nestloop = off")


def downgrade() -> None:
    op.execute("ALTER FUNCTION tasks_mark_pending() RESET enable_nestloop")
