"""The outbox's state for ``python -m outbox_relay status``: lag, parked rows, latency.

Everything comes from the views the migrations create (``outbox_lag``,
``outbox_dead``, ``outbox_publish_latency``), so the command shows what an
operator sees with ``psql``. Each query reads a partial or time index; none
scans the published rows (see :mod:`outbox_relay.queries`).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from outbox_relay import queries
from outbox_relay.config import asyncpg_dsn
from outbox_relay.store import CONNECT_TIMEOUT_SECONDS, database_errors
from outbox_relay.tables import format_seconds, render_table

#: Parked rows listed by the status command, newest first.
RECENT_DEAD_LIMIT = 10

#: Longest ``last_error`` shown in the table (the JSON has it whole).
ERROR_COLUMN_WIDTH = 60


class RoutingKeyLag(msgspec.Struct, frozen=True, kw_only=True):
    """Unpublished rows of one routing key (a row of ``outbox_lag``)."""

    routing_key: str
    pending: int
    due: int
    oldest_age_seconds: float
    max_attempts_so_far: int


class ParkedRow(msgspec.Struct, frozen=True, kw_only=True):
    """A row the relay gave up on (a row of ``outbox_dead``)."""

    id: int
    routing_key: str
    correlation_id: str | None
    attempts: int
    last_error: str | None
    dead_at: str


class LatencyWindow(msgspec.Struct, frozen=True, kw_only=True):
    """Creation-to-confirm latency over one recent window (``outbox_publish_latency``).

    The percentiles are None when nothing was published in the window.
    """

    window: str
    window_seconds: int
    published: int
    p50_seconds: float | None
    p90_seconds: float | None
    p99_seconds: float | None
    max_seconds: float | None


class OutboxLag(msgspec.Struct, frozen=True, kw_only=True):
    """How far the relays are behind and how fast they publish."""

    pending: int
    dead: int
    published_last_minute: int
    routing_keys: list[RoutingKeyLag]
    publish_latency: list[LatencyWindow]
    recent_dead: list[ParkedRow]


async def read_lag(database_url: str) -> OutboxLag:
    """Read the outbox's state over a connection of its own (four cheap queries)."""
    with database_errors():
        conn: asyncpg.Connection[Any] = await asyncpg.connect(
            asyncpg_dsn(database_url), timeout=CONNECT_TIMEOUT_SECONDS
        )
    try:
        with database_errors():
            by_key = await conn.fetch(queries.LAG_BY_ROUTING_KEY)
            totals = await conn.fetchrow(queries.LAG_TOTALS)
            latency = await conn.fetch(queries.PUBLISH_LATENCY)
            dead = await conn.fetch(queries.RECENT_DEAD, RECENT_DEAD_LIMIT)
    finally:
        await conn.close()

    assert totals is not None  # an aggregate without GROUP BY yields one row
    routing_keys = [RoutingKeyLag(**dict(row)) for row in by_key]
    return OutboxLag(
        pending=sum(key.pending for key in routing_keys),
        dead=totals["dead"],
        published_last_minute=totals["published_last_minute"],
        routing_keys=routing_keys,
        publish_latency=[LatencyWindow(**dict(row)) for row in latency],
        recent_dead=[
            ParkedRow(**{**dict(row), "dead_at": row["dead_at"].isoformat()})
            for row in dead
        ],
    )


def format_lag(lag: OutboxLag) -> str:
    """The state as the tables ``python -m outbox_relay status`` prints."""
    sections = []

    pending = render_table(
        ("routing key", "pending", "due", "oldest", "max attempts"),
        [
            (
                key.routing_key,
                str(key.pending),
                str(key.due),
                format_seconds(key.oldest_age_seconds),
                str(key.max_attempts_so_far),
            )
            for key in lag.routing_keys
        ],
    )
    if not lag.routing_keys:
        pending += "\n(nothing pending)"
    sections.append(pending)

    sections.append(
        render_table(
            ("publish latency", "published", "p50", "p90", "p99", "max"),
            [
                (
                    f"last {window.window}",
                    str(window.published),
                    format_seconds(window.p50_seconds),
                    format_seconds(window.p90_seconds),
                    format_seconds(window.p99_seconds),
                    format_seconds(window.max_seconds),
                )
                for window in lag.publish_latency
            ],
        )
    )

    if lag.recent_dead:
        sections.append(
            render_table(
                ("parked id", "routing key", "attempts", "dead at", "last error"),
                [
                    (
                        str(row.id),
                        row.routing_key,
                        str(row.attempts),
                        row.dead_at[:19].replace("T", " "),
                        _shorten(row.last_error or ""),
                    )
                    for row in lag.recent_dead
                ],
                align="rlrll",
            )
        )

    sections.append(
        f"pending {lag.pending}, dead {lag.dead}, "
        f"published in the last minute {lag.published_last_minute}"
    )
    return "\n\n".join(sections)


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= ERROR_COLUMN_WIDTH:
        return text
    return text[: ERROR_COLUMN_WIDTH - 1] + "…"
