"""The batcher on its own, with a statement that only records its calls."""

from __future__ import annotations

import asyncio

import pytest

from consumer.batching import Batcher
from consumer.errors import DatabaseUnavailableError


class Statement:
    """Answers each request with its double; fails on the values it is told."""

    def __init__(self, *, refuses: int | None = None, down: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.refuses = refuses
        self.down = down
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, requests: list[int]) -> list[int]:
        self.calls.append(list(requests))
        await self.release.wait()
        if self.down:
            raise DatabaseUnavailableError("connection refused")
        if self.refuses in requests:
            raise ValueError(f"refused {self.refuses}")
        return [2 * r for r in requests]


def by_value(request: int) -> tuple[int]:
    return (request,)


async def test_requests_made_while_a_batch_runs_share_the_next_one() -> None:
    statement = Statement()
    statement.release.clear()
    batcher = Batcher(statement, keys=by_value)

    first = asyncio.create_task(batcher.run(1))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.run(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    statement.release.set()

    assert await asyncio.gather(first, *rest) == [2, 4, 6, 8]
    assert statement.calls == [[1], [2, 3, 4]]


async def test_requests_sharing_a_key_never_share_a_batch() -> None:
    statement = Statement()
    statement.release.clear()
    batcher = Batcher(statement, keys=lambda r: (r % 10,))

    blocker = asyncio.create_task(batcher.run(100))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(batcher.run(n)) for n in (1, 11, 2, 21)]
    await asyncio.sleep(0)
    statement.release.set()

    assert await asyncio.gather(blocker, *waiting) == [200, 2, 22, 4, 42]
    assert statement.calls == [[100], [1, 2], [11], [21]]


async def test_a_batch_holds_at_most_its_limit() -> None:
    statement = Statement()
    statement.release.clear()
    batcher = Batcher(statement, keys=by_value, max_size=2)

    tasks = [asyncio.create_task(batcher.run(n)) for n in range(5)]
    await asyncio.sleep(0)
    statement.release.set()
    await asyncio.gather(*tasks)

    assert statement.calls == [[0], [1, 2], [3, 4]]


async def test_a_refused_request_fails_alone() -> None:
    statement = Statement(refuses=3)
    statement.release.clear()
    batcher = Batcher(statement, keys=by_value)

    blocker = asyncio.create_task(batcher.run(1))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(batcher.run(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    statement.release.set()
    results = await asyncio.gather(blocker, *waiting, return_exceptions=True)

    assert results[:2] == [2, 4] and results[3] == 8
    assert isinstance(results[2], ValueError)
    assert statement.calls == [[1], [2, 3, 4], [2], [3], [4]]


async def test_an_outage_reaches_every_member_without_a_retry() -> None:
    statement = Statement(down=True)
    statement.release.clear()
    batcher = Batcher(statement, keys=by_value)

    blocker = asyncio.create_task(batcher.run(1))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(batcher.run(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    statement.release.set()

    for task in (blocker, *waiting):
        with pytest.raises(DatabaseUnavailableError):
            await task
    assert statement.calls == [[1], [2, 3]]


async def test_a_request_cancelled_before_its_batch_starts_never_runs() -> None:
    statement = Statement()
    statement.release.clear()
    batcher = Batcher(statement, keys=by_value)

    blocker = asyncio.create_task(batcher.run(1))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(batcher.run(2))
    kept = asyncio.create_task(batcher.run(3))
    await asyncio.sleep(0)
    cancelled.cancel()
    statement.release.set()

    assert await blocker == 2
    assert await kept == 6
    assert statement.calls == [[1], [3]]
    await batcher.wait_idle()
