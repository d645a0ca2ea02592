"""The benchmark harness, at a size that fits in the suite.

``bench/run`` takes about 25 minutes; these runs check that its stage
measurements still work against the real processes, and that its storage
measurement compares like with like: the relay's claim takes the same rows,
through its index, with published rows in the table as without. No timing
is asserted: rates only have to be measured at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import figures, storage

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


async def test_the_stage_benchmark_measures_every_rate(tmp_path: Path) -> None:
    numbers = await figures.stage_figures(300, tmp_path)

    assert set(numbers) == {
        "relay_rate",
        "raw_publish_rate",
        "consumer_rate",
        "raw_consume_rate",
    }
    assert all(rate > 0 for rate in numbers.values()), numbers


async def test_the_storage_benchmark_claims_the_same_rows_with_published_ones() -> None:
    result = await storage.pending_query_buffers(20_000, rounds=1)

    # The claim takes the pending rows and nothing else, whatever the table
    # holds; its buffer count is what the benchmark reports.
    claimed = result["without_published"]["rows_claimed"]
    assert claimed > 0
    assert all(r["buffers"] > 0 for r in result["with_published_rounds"]), result[
        "with_published_rounds"
    ]
    assert result["with_published"]["rows_claimed"] == claimed
    assert result["purged"]["rows_claimed"] == claimed
    assert "ix_outbox_pending" in result["with_published"]["indexes"]

    # Buffers are counts, not timings: published rows change none of them.
    # Execution reads only the heap and the two pending indexes (the claim's
    # updates are HOT, so the primary key is never descended), and exactly as
    # much as once the published rows are gone.
    read = {
        name
        for name, blocks in result["with_published"]["by_relation"].items()
        if blocks > 0
    }
    assert read <= {"outbox", "ix_outbox_pending", "ix_outbox_pending_correlation"}
    assert result["equal_to_purged"], (
        result["with_published_rounds"],
        result["purged"]["buffers"],
    )
