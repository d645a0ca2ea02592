"""The key-order index gets a predicate that only the order check uses.

``ix_outbox_pending`` and ``ix_outbox_pending_correlation`` had the same
predicate (``published_at IS NULL AND dead_at IS NULL``), so for the claim's
order check, "the smallest unpublished id of this key", the planner could
pick either, or walk ``pk_outbox`` in id order. When the statistics put the
backlog at a row or two (a few pending rows among millions, or a table just
purged), all three look equally cheap, and the two wrong ones read every
pending row for each candidate.

Written as ``coalesce(published_at, dead_at) IS NULL``, which means the same
but which the planner does not take for the other predicate, the index is
the only partial index the check can use, and with an equality on its
leading column it costs a descent against a walk of ``pk_outbox``. The
claim's own scan keeps ``ix_outbox_pending``.

The index is rebuilt in the migration's transaction, not CONCURRENTLY: it
holds only the backlog, but building it reads the whole table while writes
to ``outbox`` wait, seconds for millions of rows.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_outbox_pending_correlation"


def upgrade() -> None:
    _rebuild("coalesce(published_at, dead_at) IS NULL")


def downgrade() -> None:
    _rebuild("published_at IS NULL AND dead_at IS NULL")


def _rebuild(predicate: str) -> None:
    op.drop_index(INDEX, table_name="outbox")
    op.create_index(
        INDEX,
        "outbox",
        ["correlation_id", "id"],
        postgresql_where=sa.text(predicate),
    )
