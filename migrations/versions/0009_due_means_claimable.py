"""``outbox_lag.due`` counts only rows a relay could claim now.

A row with a ``correlation_id`` waits until every earlier unpublished, live
row of its key is published (the relay's ordering per key). Until now such a
row counted as due as soon as its own ``available_at`` came, though no relay
may take it: a scheduled task cancelled before its ``run_at`` left its
``task.cancelled`` row due behind the ``task.created`` row, and the backlog
looked stuck until the ``run_at``. A row held back behind an earlier one is
no longer due; the earlier row counts instead, once it is due itself.

The relay's ``outbox_longest_due_seconds`` gauge changes the same way in
``outbox_relay.queries.PENDING_SUMMARY``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: ``outbox_lag`` as revision 0005 left it, but for what counts as due; the
#: columns and their order stay.
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
      FROM outbox AS candidate
     WHERE published_at IS NULL AND dead_at IS NULL
     GROUP BY routing_key
"""
#: Due, not leased, and the oldest unpublished, live row of its key (or
#: without a key): the relay's claim would take it.
_CLAIMABLE = """available_at <= now()
        AND (leased_until IS NULL OR leased_until <= now())
        AND candidate.id <= coalesce((
                SELECT min(earlier.id)
                  FROM outbox AS earlier
                 WHERE earlier.correlation_id = candidate.correlation_id
                   AND coalesce(earlier.published_at, earlier.dead_at) IS NULL),
                candidate.id)"""
OUTBOX_LAG = _OUTBOX_LAG.format(due=_CLAIMABLE)
#: The view as revision 0005 left it, restored on downgrade.
OUTBOX_LAG_0005 = _OUTBOX_LAG.format(
    due="available_at <= now() AND (leased_until IS NULL OR leased_until <= now())"
)


def upgrade() -> None:
    op.execute(OUTBOX_LAG)


def downgrade() -> None:
    op.execute(OUTBOX_LAG_0005)
