"""Does the relay's claim cost depend on how many rows were already published?

The claim (``outbox_relay.queries.CLAIM_BATCH``) is meant to read only
``ix_outbox_pending`` and ``ix_outbox_pending_correlation``, partial indexes
whose entries are the unpublished, live rows, so a table holding millions of
published rows should cost it exactly as many buffers as an empty one. This
measures that: the same pending rows are claimed once with nothing else in
the table, then next to ``published_rows`` published ones, and once more
after those are deleted again, each time after ``VACUUM ANALYZE``, with
``EXPLAIN (ANALYZE, BUFFERS)`` inside a transaction that is rolled back, so
the claim is executed but never kept.

The last one, "purged", is the baseline the figure uses: the same pending
rows on the same heap pages, with no published row left. A table that only
ever held a hundred rows is ten pages, which the planner rightly reads with
sequential scans, and a sequential scan counts each page once where an index
scan counts it once per row; the purged table is large enough that the
planner picks the plan the large table gets, so what differs is only whether
published rows are there.

The second table is built like a live one's history: published rows first,
then the backlog as the newest rows. Buffers are counted for the statement's
execution only: planning reads catalogs and index edges (the planner probes
the ends of an index for out-of-histogram values) and the AFTER STATEMENT
trigger on ``outbox`` runs after the plan has finished, so neither is part of
"what the claim reads". Both are still returned, for the record.

``python -m bench.storage [--quick]`` prints the result as JSON; ``--quick``
uses 200,000 published rows instead of five million.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from bench.env import scratch_database
from outbox_relay.queries import CLAIM_BATCH

PUBLISHED_ROWS = 5_000_000
#: A size whose ``pk_outbox`` is already as tall as five million rows make it
#: (three levels), for a run of seconds rather than minutes.
QUICK_PUBLISHED_ROWS = 200_000

#: Rows waiting to be claimed: fewer than a batch, so one claim takes them all.
PENDING_ROWS = 100
BATCH = 256
#: The relay's default ``RELAY_LEASE_SECONDS``.
LEASE_SECONDS = 60.0
RELAY_NAME = "bench-relay"
_CLAIM_ARGS = (LEASE_SECONDS, RELAY_NAME, BATCH)

#: Loading five million rows and vacuuming them takes a minute or two on a
#: laptop; a stalled server must not hang the benchmark forever.
STATEMENT_TIMEOUT_MS = 30 * 60 * 1000
OVERALL_TIMEOUT_SECONDS = 60 * 60

#: What ``with_published_rounds`` keeps of each round.
_ROUND_KEYS = (
    "buffers",
    "pending_estimate",
    "new_version_pages",
    "indexes",
    "by_relation",
)

OUTBOX_INDEXES = (
    "pk_outbox",
    "ix_outbox_pending",
    "ix_outbox_pending_correlation",
    "ix_outbox_published_at",
    "ix_outbox_dead_at",
)

# The pending rows get the ids after the published ones, given explicitly, so
# that both measurements claim the very same rows, and in the second they are
# the newest rows of the table, written after its history as in a live one.
_INSERT_PENDING = """
INSERT INTO outbox (id, routing_key, body, headers, correlation_id,
                    created_at, available_at)
OVERRIDING SYSTEM VALUE
SELECT $1::bigint + i,
       'task.created',
       jsonb_build_object('task_id', task_id, 'type', 'checksum',
                          'status', 'NEW'),
       jsonb_build_object('x-request-id', md5('p' || i),
                          'traceparent',
                          '00-' || md5('t' || i) || '-' || left(md5('s' || i), 16)
                              || '-01'),
       task_id,
       now() - interval '1 second',
       now() - interval '1 second'
  FROM generate_series(1, $2::int) AS i,
       LATERAL (SELECT md5('pending' || i)::uuid::text AS task_id) AS t
"""

# What a week of traffic leaves behind: per task a task.created and a
# task.completed row, both published 50 ms after they were written, spread
# evenly over the last seven days and older than every pending row.
_INSERT_PUBLISHED = """
INSERT INTO outbox (id, routing_key, body, headers, correlation_id,
                    created_at, available_at, published_at)
OVERRIDING SYSTEM VALUE
SELECT i,
       CASE WHEN i % 2 = 1 THEN 'task.created' ELSE 'task.completed' END,
       CASE WHEN i % 2 = 1
            THEN jsonb_build_object('task_id', task_id, 'type', 'checksum',
                                    'status', 'NEW')
            ELSE jsonb_build_object('task_id', task_id, 'type', 'checksum',
                                    'status', 'COMPLETED', 'attempts', 1)
       END,
       jsonb_build_object('x-request-id', md5('r' || i),
                          'traceparent',
                          '00-' || md5('t' || i) || '-' || left(md5('s' || i), 16)
                              || '-01'),
       task_id,
       at,
       at,
       at + interval '50 milliseconds'
  FROM generate_series(1, $1::int) AS i,
       LATERAL (SELECT md5('done' || ((i + 1) / 2))::uuid::text AS task_id,
                       now() - interval '1 minute'
                           - interval '7 days' * (1 - i::float8 / $1::int) AS at
               ) AS t
"""

#: Heap pages the claim wrote its new row versions to (before the rollback).
_NEW_VERSION_PAGES = """
SELECT count(DISTINCT (ctid::text::point)[0])
  FROM outbox
 WHERE published_at IS NULL AND dead_at IS NULL AND claimed_by = $1
"""

#: What the planner believes ``ix_outbox_pending`` holds.
_PENDING_ESTIMATE = (
    "SELECT 1 FROM outbox WHERE published_at IS NULL AND dead_at IS NULL"
)

_INDEX_SHAPES = """
SELECT c.relname AS name,
       pg_relation_size(c.oid) / current_setting('block_size')::int AS pages,
       (m).level AS levels_below_root,
       (m).fastlevel AS fast_root_level
  FROM pg_class AS c,
       LATERAL (SELECT bt_metap(c.relname::text) AS m) AS meta
 WHERE c.relname = ANY($1::text[])
 ORDER BY c.relname
"""


async def pending_query_buffers(
    published_rows: int = PUBLISHED_ROWS,
    *,
    pending_rows: int = PENDING_ROWS,
    rounds: int = 3,
) -> dict[str, Any]:
    """Buffers the claim of ``pending_rows`` reads without and with
    ``published_rows`` published rows in the outbox.

    The first table holds only the pending rows. The second is rebuilt with
    the published rows first and then the same pending rows (same ids and
    columns), and is measured ``rounds`` times, each after its own
    ``VACUUM ANALYZE``, because the plan depends on whether ANALYZE's sample
    happened to contain a pending row.

    Returns a dict with:

    - ``published_rows``, ``pending_rows``, ``batch``;
    - ``without_published``, ``with_published`` (its first round),
      ``baseline_repeat`` (the first table once more, after the rolled-back
      claim was vacuumed away: how far a measurement repeats by itself) and
      ``baseline_same_plan`` (the first table with sequential scans barred,
      so it gets the index plan the large table gets). Each holds
      ``buffers`` (shared hit + read during execution), ``shared_hit``,
      ``shared_read``, ``shared_dirtied``, ``planning_buffers``,
      ``rows_claimed``, ``new_version_pages`` (heap pages the claimed rows'
      new versions went to), ``pending_estimate`` (rows the planner expects
      in ``ix_outbox_pending``), ``execution_ms``, ``trigger_ms``,
      ``node_types``, ``indexes`` (those the plan reads), ``nodes`` (each plan
      node with its own buffers, children's excluded), ``by_access`` (own
      buffers per node type, relation and index), ``by_relation`` (blocks of
      each table and index read by execution, from the statistics counters)
      and ``index_shapes`` (pages and B-tree levels of the outbox indexes);
    - ``with_published_rounds``: per round ``buffers``, ``pending_estimate``,
      ``new_version_pages``, ``indexes`` and ``by_relation``;
    - ``equal``: whether every round read as many buffers as the claim
      without published rows; ``difference`` and ``same_plan_difference``:
      the first round's buffers minus those of the two baselines;
    - ``purged``: the claim once the published rows are deleted and vacuumed
      away, the pending rows staying where they are; ``equal_to_purged``:
      whether every round read exactly as many buffers as that;
    - ``access_differences`` and ``relation_differences``: the entries of
      ``by_access`` and ``by_relation`` that differ between
      ``without_published`` and ``with_published``.

    Runs in a scratch database, dropped afterwards; raises ``TimeoutError``
    if the whole run exceeds an hour.
    """
    async with asyncio.timeout(OVERALL_TIMEOUT_SECONDS), scratch_database() as url:
        conn = await asyncpg.connect(
            url,
            server_settings={
                "application_name": "bench.storage",
                "statement_timeout": str(STATEMENT_TIMEOUT_MS),
            },
        )
        try:
            return await _measure(conn, published_rows, pending_rows, rounds)
        finally:
            await conn.close()


async def _measure(
    conn: asyncpg.Connection, published_rows: int, pending_rows: int, rounds: int
) -> dict[str, Any]:
    await conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
    await conn.execute(_INSERT_PENDING, published_rows, pending_rows)

    await _vacuum(conn)
    without = await _claim_plan(conn)
    # The claim was rolled back, but its new row versions and their index
    # entries stay until a vacuum; this one removes them, as the vacuum
    # before every measurement does.
    await _vacuum(conn)
    repeat = await _claim_plan(conn)
    await _vacuum(conn)
    # A hundred rows fit in a few pages, so the planner rightly scans them;
    # barred from that, it picks the plan the large table gets, which
    # separates what the plan's shape costs from what the table's size does.
    same_plan = await _claim_plan(conn, enable_seqscan="off")

    await conn.execute("TRUNCATE outbox")
    await conn.execute(_INSERT_PUBLISHED, published_rows)
    await conn.execute(_INSERT_PENDING, published_rows, pending_rows)
    # ANALYZE samples 30,000 rows: among millions, a hundred pending rows are
    # in the sample or not, and the plan follows. Each round draws again.
    with_published = []
    for _ in range(rounds):
        await _vacuum(conn)
        with_published.append(await _claim_plan(conn))
    first = with_published[0]

    await conn.execute("DELETE FROM outbox WHERE published_at IS NOT NULL")
    await _vacuum(conn)
    purged = await _claim_plan(conn)

    return {
        "published_rows": published_rows,
        "pending_rows": pending_rows,
        "batch": BATCH,
        "without_published": without,
        "with_published": first,
        "with_published_rounds": [
            {key: run[key] for key in _ROUND_KEYS} for run in with_published
        ],
        "baseline_repeat": repeat,
        "baseline_same_plan": same_plan,
        "equal": all(run["buffers"] == without["buffers"] for run in with_published),
        "purged": purged,
        "equal_to_purged": all(
            run["buffers"] == purged["buffers"] for run in with_published
        ),
        "difference": first["buffers"] - without["buffers"],
        "same_plan_difference": first["buffers"] - same_plan["buffers"],
        "access_differences": _differences(without["by_access"], first["by_access"]),
        "relation_differences": _differences(
            without["by_relation"], first["by_relation"]
        ),
    }


async def _vacuum(conn: asyncpg.Connection) -> None:
    await conn.execute("VACUUM (ANALYZE) outbox")
    await conn.execute("VACUUM (ANALYZE) tasks")


async def _claim_plan(conn: asyncpg.Connection, **settings: str) -> dict[str, Any]:
    """Execute the claim under EXPLAIN ANALYZE and roll it back; ``settings``
    are planner settings for this transaction only."""
    shapes = [
        dict(row) for row in await conn.fetch(_INDEX_SHAPES, list(OUTBOX_INDEXES))
    ]
    transaction = conn.transaction()
    await transaction.start()
    try:
        for name, value in settings.items():
            await conn.execute(f"SET LOCAL {name} = {value}")
        start = await _relation_blocks(conn)
        await conn.fetchval("EXPLAIN " + CLAIM_BATCH, *_CLAIM_ARGS)
        planned = await _relation_blocks(conn)
        document = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + CLAIM_BATCH, *_CLAIM_ARGS
        )
        executed = await _relation_blocks(conn)
        new_version_pages = await conn.fetchval(_NEW_VERSION_PAGES, RELAY_NAME)
        pending_estimate = json.loads(
            await conn.fetchval("EXPLAIN (FORMAT JSON) " + _PENDING_ESTIMATE)
        )[0]["Plan"]["Plan Rows"]
    finally:
        await transaction.rollback()

    # Planning reads outbox indexes too (the ends of ix_outbox_pending, for
    # the selectivity of ``available_at <= now()``); planning once more
    # before the measured run tells those reads apart from execution's.
    by_relation = {
        name: (executed[name] - planned[name]) - (planned[name] - start[name])
        for name in executed
    }

    explained = json.loads(document)[0]
    root = explained["Plan"]
    planning = explained.get("Planning", {})
    nodes = list(_own_buffers(root, path="0"))
    modify = next(n for n in _walk(root) if n["Node Type"] == "ModifyTable")
    return {
        "buffers": root["Shared Hit Blocks"] + root["Shared Read Blocks"],
        "shared_hit": root["Shared Hit Blocks"],
        "shared_read": root["Shared Read Blocks"],
        "shared_dirtied": root["Shared Dirtied Blocks"],
        "planning_buffers": planning.get("Shared Hit Blocks", 0)
        + planning.get("Shared Read Blocks", 0),
        "rows_claimed": modify["Actual Rows"],
        "new_version_pages": new_version_pages,
        "pending_estimate": pending_estimate,
        "execution_ms": explained["Execution Time"],
        "trigger_ms": sum(t["Time"] for t in explained.get("Triggers", [])),
        "node_types": sorted({n["Node Type"] for n in _walk(root)}),
        "indexes": sorted({n["Index Name"] for n in _walk(root) if "Index Name" in n}),
        "nodes": nodes,
        "by_access": by_access(nodes),
        "by_relation": {name: n for name, n in sorted(by_relation.items()) if n},
        "index_shapes": shapes,
    }


async def _relation_blocks(conn: asyncpg.Connection) -> dict[str, int]:
    """Blocks of every table and index of the schema that this transaction
    has read so far (hit or not, all forks: a heap's visibility map and free
    space map count as the heap's)."""
    rows = await conn.fetch(
        """
        SELECT relname, pg_stat_get_xact_blocks_fetched(oid) AS blocks
          FROM pg_class
         WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'i')
        """
    )
    return {row["relname"]: row["blocks"] for row in rows}


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", []):
        found += _walk(child)
    return found


def _own_buffers(node: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """Each node with the buffers it read itself, its children's subtracted.

    EXPLAIN reports a node's buffers including everything run beneath it;
    the difference per node is what says which relation's pages changed. A
    CTE is the exception: its plan is listed under the node that declares it
    but runs while the CTE Scan reads it, so its buffers are counted in the
    CTE Scan's and subtracted there.
    """
    children = node.get("Plans", [])
    ctes = {
        c["Subplan Name"].removeprefix("CTE "): _total(c)
        for c in children
        if c.get("Subplan Name", "").startswith("CTE ")
    }
    run_beneath = [
        c for c in children if not c.get("Subplan Name", "").startswith("CTE ")
    ]
    found = [_entry(node, path, _total(node) - sum(map(_total, run_beneath)))]
    for number, child in enumerate(children):
        found += _own_buffers(child, f"{path}.{number}")
    # The CTE Scans reading a CTE declared here sit among this node's
    # descendants; the CTE's buffers are theirs to give back.
    for entry in found[1:]:
        if entry["node"] == "CTE Scan" and entry["cte"] in ctes:
            entry["own_buffers"] -= ctes.pop(entry["cte"])
    return found


def _total(node: dict[str, Any]) -> int:
    return int(node["Shared Hit Blocks"] + node["Shared Read Blocks"])


def _entry(node: dict[str, Any], path: str, own: int) -> dict[str, Any]:
    return {
        "path": path,
        "node": node["Node Type"],
        "relation": node.get("Relation Name"),
        "index": node.get("Index Name"),
        "cte": node.get("CTE Name"),
        "plan_rows": node["Plan Rows"],
        "rows": node["Actual Rows"],
        "loops": node["Actual Loops"],
        "buffers": _total(node),
        "own_buffers": own,
    }


def by_access(nodes: list[dict[str, Any]]) -> dict[str, int]:
    """Own buffers summed per kind of access (node type, relation, index).

    Plans of a different shape still compare this way: what counts is which
    relation's pages were read, not where in the tree.
    """
    totals: dict[str, int] = {}
    for node in nodes:
        key = " ".join(
            part
            for part in (node["node"], node["relation"], node["index"])
            if part is not None
        )
        totals[key] = totals.get(key, 0) + node["own_buffers"]
    return {key: value for key, value in sorted(totals.items()) if value}


def _differences(
    before: dict[str, int], after: dict[str, int]
) -> dict[str, dict[str, int]]:
    return {
        key: {
            "without_published": before.get(key, 0),
            "with_published": after.get(key, 0),
        }
        for key in sorted(before.keys() | after.keys())
        if before.get(key, 0) != after.get(key, 0)
    }


def main() -> None:
    import sys

    size = QUICK_PUBLISHED_ROWS if "--quick" in sys.argv[1:] else PUBLISHED_ROWS
    result = asyncio.run(pending_query_buffers(size))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
