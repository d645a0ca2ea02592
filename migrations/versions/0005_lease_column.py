"""A relay's lease gets a column of its own, outside every index.

Until now a claim pushed ``available_at`` forward to lease its rows. That
column is indexed, so every claim was a non-HOT update: each claimed row got
a new entry in every index of ``outbox``, the primary key included, and the
primary key's depth grows with the published rows the table keeps. The claim
therefore read more pages the longer the service had run.

``leased_until`` holds the lease instead and no index reads it. With room
left on each heap page (``fillfactor``), the claim's new row version stays on
its page and no index is touched: a HOT update, whose cost does not depend on
how many rows were published before. ``available_at`` now only says when a
row is due: when it was written for, or when its back-off ends.

Rows leased when this runs keep their lease: ``leased_until`` takes the
pushed ``available_at``. Stop every relay before upgrading: a relay of the
earlier version does not read ``leased_until``, and next to a relay of this
one it could claim a row that is already leased.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Percent of each new heap page that inserts fill. A claim writes a second
#: version of every row it takes, on the same page only if there is room, so
#: the rest of the page is left for those versions. Later versions (published,
#: parked) go wherever there is room, and pruning gives the page back. The
#: setting applies to pages written from now on; rows already stored are
#: claimed as before, with index entries, until they are published.
FILLFACTOR = 45

#: ``outbox_lag`` as revision 0003 created it, but for what counts as due;
#: the columns and their order stay.
_OUTBOX_LAG = """
    CREATE OR REPLACE VIEW outbox_lag AS
    SELECT routing_key,
           count(*) AS pending,
           min(created_at) AS oldest_created_at,
           now() - min(created_at) AS oldest_age,
           max(attempts) AS max_attempts_so_far,
           count(*) FILTER (WHERE {due}) AS due,
           extract(epoch FROM now() - min(created_at))::float8
               AS oldest_age_seconds
      FROM outbox
     WHERE published_at IS NULL AND dead_at IS NULL
     GROUP BY routing_key
"""
#: A leased row is not due.
OUTBOX_LAG = _OUTBOX_LAG.format(
    due="available_at <= now() AND (leased_until IS NULL OR leased_until <= now())"
)
#: The view as revision 0003 created it, restored on downgrade.
OUTBOX_LAG_0003 = _OUTBOX_LAG.format(due="available_at <= now()")


def upgrade() -> None:
    op.add_column(
        "outbox", sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute(
        """
        UPDATE outbox
           SET leased_until = available_at
         WHERE claimed_by IS NOT NULL
           AND published_at IS NULL
           AND available_at > now()
        """
    )
    op.execute(f"ALTER TABLE outbox SET (fillfactor = {FILLFACTOR})")
    op.execute(OUTBOX_LAG)


def downgrade() -> None:
    # A row still leased keeps its lease the earlier way.
    op.execute(
        """
        UPDATE outbox
           SET available_at = leased_until
         WHERE leased_until > available_at
           AND published_at IS NULL
        """
    )
    op.execute(OUTBOX_LAG_0003)
    op.execute("ALTER TABLE outbox RESET (fillfactor)")
    op.drop_column("outbox", "leased_until")
