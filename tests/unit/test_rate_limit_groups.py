"""How the rate limiter groups a principal's concurrent requests, on a fake
counter: one call per group, and as many admitted as calls one by one would."""

from __future__ import annotations

import asyncio
from typing import Any

from limits.errors import StorageError

from service.errors import RateLimitedError
from service.rate_limit import PrincipalRateLimiter


class FakeCounter:
    """Admits ``room`` requests in all; records the cost of every call."""

    def __init__(self, room: int, fail: bool = False) -> None:
        self.room = room
        self.fail = fail
        self.costs: list[int] = []

    async def hit(self, item: Any, principal: str, cost: int = 1) -> bool:
        self.costs.append(cost)
        await asyncio.sleep(0.01)  # a round trip, during which others queue
        if self.fail:
            raise StorageError(ConnectionError("down"))
        if cost > self.room:
            return False
        self.room -= cost
        return True

    async def get_window_stats(self, item: Any, principal: str) -> Any:
        class Stats:
            reset_time = 0.0

        return Stats()


def limiter(counter: FakeCounter) -> PrincipalRateLimiter:
    limiter = PrincipalRateLimiter("redis://127.0.0.1:1/0", 100, "unit")
    limiter._limiter = counter  # type: ignore[assignment]
    return limiter


async def outcomes(limiter: PrincipalRateLimiter, count: int) -> list[str]:
    async def one() -> str:
        try:
            await limiter.hit("alice")
        except RateLimitedError:
            return "refused"
        return "admitted"

    return await asyncio.gather(*(one() for _ in range(count)))


async def test_a_burst_costs_two_calls() -> None:
    counter = FakeCounter(room=100)

    assert await outcomes(limiter(counter), 10) == ["admitted"] * 10
    # The first request goes alone; the nine behind it go together.
    assert counter.costs == [1, 9]


async def test_a_group_that_does_not_fit_is_counted_one_by_one() -> None:
    counter = FakeCounter(room=4)

    result = await outcomes(limiter(counter), 10)

    assert result == ["admitted"] * 4 + ["refused"] * 6
    assert counter.costs == [1, 9, 1, 1, 1, 1]


async def test_lone_requests_go_at_once_and_idle_principals_are_forgotten() -> None:
    counter = FakeCounter(room=10)
    limited = limiter(counter)

    for _ in range(3):
        assert await outcomes(limited, 1) == ["admitted"]

    assert counter.costs == [1, 1, 1]
    assert limited._waiting == {}


async def test_every_request_of_a_group_passes_when_the_store_is_down() -> None:
    counter = FakeCounter(room=0, fail=True)

    assert await outcomes(limiter(counter), 5) == ["admitted"] * 5
    assert counter.costs == [1, 4]
