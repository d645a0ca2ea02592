"""Operating views, per-key ordering of the outbox, and a task's trace headers.

- ``outbox_lag`` gains ``due`` and ``oldest_age_seconds``;
  ``outbox_publish_latency`` and ``inbox_throughput`` answer "how fast" in
  plain SQL. Every view reads through a partial or time index, so its cost
  follows the backlog or the recent traffic, never the table's size.
- ``ix_outbox_pending_correlation`` lets the relay's claim skip a row while
  an earlier unpublished, live row of the same ``correlation_id`` exists, so
  the events of one task reach the broker in the order they were written.
- ``tasks.trace_headers`` keeps the ``traceparent`` and ``x-request-id`` of
  the request that created (or last retried) a task, for the rows the
  stuck-task sweeper writes long after that request's messages are gone.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-17
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The view as revision 0001 created it, restored on downgrade.
OUTBOX_LAG_0001 = """
    CREATE OR REPLACE VIEW outbox_lag AS
    SELECT routing_key,
           count(*) AS pending,
           min(created_at) AS oldest_created_at,
           now() - min(created_at) AS oldest_age,
           max(attempts) AS max_attempts_so_far
      FROM outbox
     WHERE published_at IS NULL AND dead_at IS NULL
     GROUP BY routing_key
"""


def upgrade() -> None:
    op.create_index(
        "ix_outbox_pending_correlation",
        "outbox",
        ["correlation_id", "id"],
        postgresql_where=sa.text("published_at IS NULL AND dead_at IS NULL"),
    )

    op.add_column(
        "tasks",
        sa.Column(
            "trace_headers",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
    )

    # New columns go last: CREATE OR REPLACE VIEW may only append.
    op.execute("DROP VIEW outbox_lag")
    op.execute(
        """
        CREATE VIEW outbox_lag AS
        SELECT routing_key,
               count(*) AS pending,
               min(created_at) AS oldest_created_at,
               now() - min(created_at) AS oldest_age,
               max(attempts) AS max_attempts_so_far,
               count(*) FILTER (WHERE available_at <= now()) AS due,
               extract(epoch FROM now() - min(created_at))::float8
                   AS oldest_age_seconds
          FROM outbox
         WHERE published_at IS NULL AND dead_at IS NULL
         GROUP BY routing_key
        """
    )

    # Publish latency over three recent windows. Each window is its own range
    # scan of ix_outbox_published_at with a constant bound the planner can
    # estimate, so the cost follows the traffic of the window, not the size
    # of the table.
    windows = [("1 minute", 60), ("5 minutes", 300), ("1 hour", 3600)]
    selects = [
        f"""
        SELECT '{name}'::text AS "window",
               {seconds} AS window_seconds,
               count(*) AS published,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY latency) AS p50_seconds,
               percentile_cont(0.9) WITHIN GROUP (ORDER BY latency) AS p90_seconds,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY latency) AS p99_seconds,
               max(latency) AS max_seconds
          FROM (SELECT extract(epoch FROM published_at - created_at)::float8
                       AS latency
                  FROM outbox
                 WHERE published_at > now() - interval '{name}') AS recent
        """
        for name, seconds in windows
    ]
    op.execute(
        "CREATE VIEW outbox_publish_latency AS SELECT * FROM ("
        + " UNION ALL ".join(selects)
        + ") AS windows ORDER BY window_seconds"
    )

    # Messages whose effect the consumers committed, per minute of the last
    # hour (minutes without any are left out); a range scan of
    # ix_inbox_processed_at.
    op.execute(
        """
        CREATE VIEW inbox_throughput AS
        SELECT date_trunc('minute', processed_at) AS minute,
               count(*) AS processed,
               round(count(*) / 60.0, 2) AS per_second
          FROM inbox
         WHERE processed_at > now() - interval '1 hour'
         GROUP BY 1
         ORDER BY 1 DESC
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW inbox_throughput")
    op.execute("DROP VIEW outbox_publish_latency")
    op.execute("DROP VIEW outbox_lag")
    op.execute(OUTBOX_LAG_0001)
    op.drop_column("tasks", "trace_headers")
    op.drop_index("ix_outbox_pending_correlation", table_name="outbox")
