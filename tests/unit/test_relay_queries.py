"""Every statement the relay runs is named, described and well-formed."""

from __future__ import annotations

import re

import pytest

from outbox_relay import queries

NAMED_QUERIES = (
    "CLAIM_BATCH",
    "MARK_PUBLISHED",
    "MARK_FAILED",
    "RELEASE",
    "NEXT_AVAILABLE_AT",
    "PENDING_SUMMARY",
    "LAG_BY_ROUTING_KEY",
    "LAG_TOTALS",
    "RECENT_DEAD",
    "PUBLISH_LATENCY",
    "REPLAY_DEAD",
    "NOTIFY_RELAYS",
    "PING",
)


@pytest.mark.parametrize("name", NAMED_QUERIES)
def test_named_query_is_a_statement(name: str) -> None:
    sql = getattr(queries, name)

    assert isinstance(sql, str)
    assert sql.strip()


def test_every_query_in_the_module_is_listed() -> None:
    defined = {
        name
        for name, value in vars(queries).items()
        if name.isupper() and not name.startswith("_") and isinstance(value, str)
    }

    assert defined == set(NAMED_QUERIES)


@pytest.mark.parametrize("name", NAMED_QUERIES)
def test_parameters_are_numbered_without_gaps(name: str) -> None:
    numbers = {int(n) for n in re.findall(r"\$(\d+)", getattr(queries, name))}

    assert numbers == set(range(1, len(numbers) + 1))


def test_claim_skips_rows_another_relay_is_claiming() -> None:
    assert "FOR UPDATE SKIP LOCKED" in queries.CLAIM_BATCH


@pytest.mark.parametrize("name", ["CLAIM_BATCH", "NEXT_AVAILABLE_AT"])
def test_rows_behind_an_earlier_row_of_their_key_are_held_back(name: str) -> None:
    sql = " ".join(getattr(queries, name).split())

    # A row is claimable only as the smallest pending id of its key.
    assert "candidate.id <= coalesce(( SELECT min(earlier.id)" in sql
    assert "earlier.correlation_id = candidate.correlation_id" in sql
    # The predicate of ix_outbox_pending_correlation and of no other index.
    assert "coalesce(earlier.published_at, earlier.dead_at) IS NULL" in sql


@pytest.mark.parametrize("name", ["CLAIM_BATCH", "NEXT_AVAILABLE_AT"])
def test_rows_leased_to_a_relay_are_passed_over(name: str) -> None:
    sql = " ".join(getattr(queries, name).split())

    assert "(leased_until IS NULL OR leased_until <= now())" in sql


@pytest.mark.parametrize("name", ["MARK_FAILED", "RELEASE"])
def test_settling_a_failure_only_touches_rows_this_relay_holds(name: str) -> None:
    assert "claimed_by = $" in getattr(queries, name)
