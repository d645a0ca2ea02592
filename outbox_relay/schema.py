"""The outbox table, owned by the relay and written by anyone through ``enqueue``.

The relay treats every row the same way: it knows routing keys, bodies and
headers, never what a row is about. Other packages add their tables to the same
``metadata`` so Alembic sees one schema.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("routing_key", Text, nullable=False),
    Column("body", JSONB, nullable=False),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("correlation_id", Text, nullable=True),
    Column(
        "created_at", DateTime(timezone=True), nullable=False, server_default=func.now()
    ),
    # Not before this time: a scheduled message or a retry's back-off.
    Column(
        "available_at",
        DateTime(timezone=True),
        nullable=False,
        server_default=func.now(),
    ),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    Column("dead_at", DateTime(timezone=True), nullable=True),
    # The lease of the relay that claimed the row: its name and until when
    # no other relay may claim it (see outbox_relay.queries). No index reads
    # either column, so a claim is a HOT update that touches no index.
    Column("claimed_by", Text, nullable=True),
    Column("leased_until", DateTime(timezone=True), nullable=True),
    # Only unpublished, live rows are indexed, so the relay's claim reads the
    # same few pages whether the table holds a hundred or ten million
    # published rows.
    Index(
        "ix_outbox_pending",
        "available_at",
        "id",
        postgresql_where=text("published_at IS NULL AND dead_at IS NULL"),
    ),
    # The claim's ordering check: is there an earlier unpublished, live row
    # of the same correlation id? One probe of this index per candidate row
    # (see outbox_relay.queries.CLAIM_BATCH). The predicate means what
    # ix_outbox_pending's does, written so that only the check, which uses
    # the same words, can use this index (see migration 0007).
    Index(
        "ix_outbox_pending_correlation",
        "correlation_id",
        "id",
        postgresql_where=text("coalesce(published_at, dead_at) IS NULL"),
    ),
    Index(
        "ix_outbox_published_at",
        "published_at",
        postgresql_where=text("published_at IS NOT NULL"),
    ),
    Index(
        "ix_outbox_dead_at",
        "dead_at",
        postgresql_where=text("dead_at IS NOT NULL"),
    ),
    # Inserts fill each page only this far, leaving room for the version a
    # claim writes, so the claim's update stays on the row's page (see
    # migration 0005).
    postgresql_with={"fillfactor": 45},
)
