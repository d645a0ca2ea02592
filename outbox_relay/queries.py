"""Every SQL statement the relay runs, named and described in one place.

The relay never holds a transaction open while it talks to the broker: a batch
is claimed in one short statement, published, and then settled in one or two
more. Ownership of a claimed row is a lease written into the row itself
(``claimed_by`` and ``leased_until`` set), so a relay that dies mid-batch only
delays its rows by the lease, and two relays never claim the same due row at
the same time. A row is claimable when it is due (``available_at`` has come)
and not leased (no ``leased_until`` in the future).

The lease columns are outside every index, so taking and dropping a lease is
a HOT update: the row's new version stays on its page and no index gains an
entry. The claim's cost then follows the backlog, not the published rows the
table holds.

Parameters are positional (asyncpg's ``$n``); each constant says what it
expects and returns.
"""

from __future__ import annotations

from datetime import datetime

import msgspec


class OutboxRow(msgspec.Struct, frozen=True, kw_only=True):
    """One row as :data:`CLAIM_BATCH` returns it, ready to publish.

    ``body`` and ``headers`` are the stored JSON as text, so the body reaches
    the broker byte for byte as PostgreSQL renders it.
    """

    id: int
    routing_key: str
    body: str
    headers: str
    correlation_id: str | None
    created_at: datetime
    attempts: int
    #: The ``x-request-id`` and ``traceparent`` headers, if the row has them,
    #: only to name the rows in the relay's log lines; the message carries
    #: ``headers`` as they are.
    request_id: str | None = None
    traceparent: str | None = None


#: A row no relay holds: never leased, or its lease ran out.
_NOT_LEASED = "(leased_until IS NULL OR leased_until <= now())"

#: Row ``candidate`` is the oldest unpublished, live row of its key, or has
#: no key; :data:`CLAIM_BATCH` says why it is written this way.
_HEAD_OF_ITS_KEY = """candidate.id <= coalesce((
           SELECT min(earlier.id)
             FROM outbox AS earlier
            WHERE earlier.correlation_id = candidate.correlation_id
              AND coalesce(earlier.published_at, earlier.dead_at) IS NULL),
           candidate.id)"""

#: Claim up to ``$3`` due rows for relay ``$2`` for ``$1`` seconds; returns
#: them in id order, which is the order they were written in.
#:
#: ``FOR UPDATE SKIP LOCKED`` lets concurrent relays each take different rows
#: without waiting on one another. Once this statement commits (at once, it
#: runs on its own) the lease keeps the rows from every other claim until
#: ``leased_until``, so no transaction stays open while the broker confirms.
#: The inner query reads only ``ix_outbox_pending``, whose entries are the
#: unpublished, live rows in the order they fall due; leased rows among them
#: are passed over.
#:
#: The update finds the locked rows by ``ctid``, not by ``id``, so it does not
#: descend ``pk_outbox``, whose depth grows with every row the table keeps.
#: The ``ctid`` is that of the version the inner query locked: if another
#: relay changed the row after this statement's snapshot, that version is
#: one this statement cannot see, and the row is simply not claimed this
#: time; it is never claimed twice.
#:
#: Ordering per key: a row with a ``correlation_id`` is claimed only while no
#: earlier (smaller id) unpublished, live row of the same ``correlation_id``
#: exists, that is while it is the smallest id of its key in
#: ``ix_outbox_pending_correlation`` (a row without a key compares with
#: itself). So at most the oldest row of a key is ever claimed or in flight,
#: by whichever relay, and the next one only after the broker confirmed it
#: and it was marked published: one key's messages reach the broker in id
#: order however many relays run. An earlier row that is leased, scheduled
#: for later or backing off after a failure holds the later ones back; a
#: parked (dead) row does not. Rows without a ``correlation_id`` are not
#: ordered.
#:
#: The check's form is chosen for the planner:
#:
#: - ``min(id)`` is one descent of that index per candidate; asked as
#:   ``NOT EXISTS``, it became an anti-join that, with the backlog estimated
#:   at one row among millions, read all of ``ix_outbox_pending`` for each
#:   candidate.
#: - ``coalesce(published_at, dead_at) IS NULL`` is the predicate of
#:   ``ix_outbox_pending_correlation`` and of no other index, so the check
#:   cannot wander into ``ix_outbox_pending``, and against a walk of
#:   ``pk_outbox`` in id order the descent is always cheaper.
#: - ``<=`` rather than ``=``: an equality with ``id`` looks to the planner as
#:   if it kept one row in fifty thousand, and with a large backlog it then
#:   read and sorted every pending row instead of stopping after ``$3`` in
#:   index order. ``<=`` is estimated to keep a third, so the planner
#:   expects to find ``$3`` rows early in the index and stops there.
CLAIM_BATCH = f"""
WITH claimed AS (
    UPDATE outbox
       SET leased_until = now() + make_interval(secs => $1::float8),
           claimed_by = $2::text
     WHERE ctid = ANY (ARRAY(
            SELECT ctid
              FROM outbox AS candidate
             WHERE published_at IS NULL
               AND dead_at IS NULL
               AND available_at <= now()
               AND {_NOT_LEASED}
               AND {_HEAD_OF_ITS_KEY}
             ORDER BY available_at, id
             LIMIT $3::int
               FOR UPDATE SKIP LOCKED
           ))
    RETURNING id, routing_key, body::text AS body, headers::text AS headers,
              correlation_id, created_at, attempts,
              headers ->> 'x-request-id' AS request_id,
              headers ->> 'traceparent' AS traceparent
)
SELECT * FROM claimed ORDER BY id
"""

#: Record that the broker confirmed rows ``$1`` (an array of ids).
#:
#: One statement for the whole batch: the task trigger on ``outbox`` runs once
#: per statement and moves every announced task from NEW to PENDING in one go.
#: The lease holder is not checked: if this relay's lease ran out and another
#: relay published the row too, the row is published either way and the
#: ``published_at IS NULL`` guard keeps the first time.
MARK_PUBLISHED = """
UPDATE outbox
   SET published_at = now(),
       claimed_by = NULL,
       leased_until = NULL
 WHERE id = ANY($1::bigint[])
   AND published_at IS NULL
"""

#: Count one failed attempt for each row in ``$1`` with error ``$2[i]`` and
#: retry it ``$3[i]`` seconds from now; a row reaching ``$5`` attempts is
#: parked (``dead_at`` set) instead. Only rows relay ``$4`` still holds are
#: touched, so a relay whose lease expired cannot push back another relay's
#: claim. Returns each updated row with its new attempt count and whether it
#: was parked.
MARK_FAILED = """
UPDATE outbox AS o
   SET attempts = o.attempts + 1,
       last_error = f.error,
       available_at = now() + make_interval(secs => f.delay),
       dead_at = CASE WHEN o.attempts + 1 >= $5::int THEN now() END,
       claimed_by = NULL,
       leased_until = NULL
  FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS f(id, error, delay)
 WHERE o.id = f.id
   AND o.published_at IS NULL
   AND o.claimed_by = $4::text
RETURNING o.id, o.routing_key, o.attempts, o.dead_at IS NOT NULL AS dead
"""

#: Hand rows ``$1`` held by relay ``$2`` back at once, without counting an
#: attempt: the broker connection broke, which is no fault of the messages.
#: Only the lease goes; ``available_at`` had come already, so the rows are due
#: again at once, and the update stays HOT.
RELEASE = """
UPDATE outbox
   SET claimed_by = NULL,
       leased_until = NULL
 WHERE id = ANY($1::bigint[])
   AND published_at IS NULL
   AND claimed_by = $2::text
"""

#: Seconds until the earliest claimable row falls due (negative when one is
#: already due); no row when there is none. The relay sleeps no longer than
#: this, so scheduled rows and retries go out on time without polling
#: faster. Leased rows do not count: the relay holding them settles them
#: itself, and a lease left by a relay that died is found by the next poll
#: after it ran out (``RELAY_POLL_INTERVAL`` later at most). Rows held back
#: behind an earlier row of their key do not count either (they would look
#: overdue and keep the relay spinning); the earlier row's own due time
#: stands in for them. Walking ``ix_outbox_pending`` in order, the first row
#: neither leased nor held back answers, so this stays cheap however large
#: the backlog.
NEXT_AVAILABLE_AT = f"""
SELECT extract(epoch FROM available_at - now())::float8 AS seconds_until
  FROM outbox AS candidate
 WHERE published_at IS NULL
   AND dead_at IS NULL
   AND {_NOT_LEASED}
   AND {_HEAD_OF_ITS_KEY}
 ORDER BY available_at, id
 LIMIT 1
"""

#: How many rows wait, the age of the oldest, and how long the row due the
#: longest has been due, for the relay's gauges (sampled every few seconds):
#: one pass over ``ix_outbox_pending``, whose size is the backlog, not the
#: table. A row scheduled for later (a ``run_at``, a back-off) or leased by a
#: relay ages but is not due, so only the last figure says the relays are
#: behind. A row whose lease ran out counts as due since its ``available_at``:
#: it has waited that long. A row held back behind an earlier row of its key
#: is not due either (a cancelled task's event behind its ``task.created``
#: row scheduled for next week would otherwise look overdue all week); the
#: earlier row counts once it is due. The ``due`` column of the
#: ``outbox_lag`` view means the same (migration 0009).
#:
#: The last figure is :data:`NEXT_AVAILABLE_AT` turned around: the first
#: claimable row in due order is the one due the longest, if it is due at
#: all. Walking the index to it is cheap where checking every row of a large
#: backlog for an earlier row of its key is not.
PENDING_SUMMARY = f"""
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
           AS oldest_age_seconds,
       greatest(coalesce(-({NEXT_AVAILABLE_AT}), 0), 0)::float8
           AS longest_due_seconds
  FROM outbox
 WHERE published_at IS NULL
   AND dead_at IS NULL
"""

#: The backlog per routing key for ``python -m outbox_relay status``, from the
#: ``outbox_lag`` view: rows not yet published, how many are due now, the age
#: of the oldest and the most attempts any of them has had.
LAG_BY_ROUTING_KEY = """
SELECT routing_key, pending, due, oldest_age_seconds, max_attempts_so_far
  FROM outbox_lag
 ORDER BY routing_key
"""

#: Parked rows and rows published in the last minute, each counted through its
#: own partial index rather than by scanning every published row.
LAG_TOTALS = """
SELECT (SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL) AS dead,
       (SELECT count(*)
          FROM outbox
         WHERE published_at > now() - interval '1 minute') AS published_last_minute
"""

#: The ``$1`` most recently parked rows, newest first, from ``outbox_dead``.
RECENT_DEAD = """
SELECT id, routing_key, correlation_id, attempts, last_error, dead_at
  FROM outbox_dead
 ORDER BY dead_at DESC, id DESC
 LIMIT $1::int
"""

#: Publish latency (creation to confirm) over the last minute, five minutes
#: and hour, from the ``outbox_publish_latency`` view.
PUBLISH_LATENCY = """
SELECT "window", window_seconds, published,
       p50_seconds, p90_seconds, p99_seconds, max_seconds
  FROM outbox_publish_latency
"""

#: Give parked rows another chance: rows ``$1`` (an array of ids), or every
#: parked row when ``$1`` is NULL. Attempts start again from zero and the row
#: is due at once; ``last_error`` stays as a record of why it was parked until
#: a new failure replaces it. Returns the ids replayed; ids that are not
#: parked (unknown, published, or still live) are left alone.
REPLAY_DEAD = """
UPDATE outbox
   SET dead_at = NULL,
       attempts = 0,
       available_at = now(),
       claimed_by = NULL,
       leased_until = NULL
 WHERE dead_at IS NOT NULL
   AND published_at IS NULL
   AND ($1::bigint[] IS NULL OR id = ANY($1::bigint[]))
RETURNING id
"""

#: Wake the relays after a replay: the notify trigger only fires on INSERT,
#: and without it replayed rows would wait for the next poll.
NOTIFY_RELAYS = "SELECT pg_notify('outbox_pending', '')"

#: A round trip on the LISTEN connection, to find a connection that died
#: without the socket noticing (a network partition rather than a reset).
PING = "SELECT 1"
