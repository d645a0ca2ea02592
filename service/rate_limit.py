"""Each principal's request rate, counted in Redis so it holds across replicas.

The counter is a sliding window counter (the ``limits`` library): the count
of the current minute plus the previous minute's, weighted by how much of it
still lies in the last 60 seconds. That avoids the double burst a fixed
window allows at its edges, and costs one O(1) script in Redis per request
whatever N is; a moving window keeps one list entry per request and walks it,
which gets slower the higher the limit. Every API replica points at the same
Redis, so a principal gets N per minute in all, not N per replica.

When Redis cannot be reached the request goes through (fail open) and a
WARNING is logged: the limit protects capacity, and refusing every request
because the limiter is down would turn a Redis outage into an API outage.
"""

from __future__ import annotations

import asyncio
import math
import time

import structlog
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from service.errors import RateLimitedError
from service.settings import ServiceSettings

#: Longest a request waits for Redis before it is let through unchecked.
STORE_TIMEOUT_SECONDS = 1.0

logger = structlog.get_logger(__name__)


def async_storage_url(url: str) -> str:
    """``redis://…`` as the ``limits`` library names its asyncio Redis storage."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in {"redis", "rediss"}:
        raise ValueError("RATE_LIMIT_STORAGE_URL must be a redis:// or rediss:// URL")
    return f"async+{scheme}://{rest}"


class PrincipalRateLimiter:
    """About ``per_minute`` requests per principal in any 60 seconds."""

    def __init__(self, storage_url: str, per_minute: int, key_prefix: str) -> None:
        self._limit = RateLimitItemPerMinute(per_minute)
        self._storage = RedisStorage(
            async_storage_url(storage_url),
            wrap_exceptions=True,
            key_prefix=key_prefix,
            # redis-py with the hiredis parser: the same script in Redis for
            # about a third of coredis' CPU per request in this process.
            implementation="redispy",
            socket_connect_timeout=STORE_TIMEOUT_SECONDS,
            socket_timeout=STORE_TIMEOUT_SECONDS,
        )
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> PrincipalRateLimiter | None:
        if settings.api_rate_limit_per_minute == 0:
            return None
        return cls(
            settings.rate_limit_storage_url,
            settings.api_rate_limit_per_minute,
            settings.rate_limit_key_prefix,
        )

    async def hit(self, principal: str) -> None:
        """Count one request; raise RateLimitedError if it is one too many."""
        try:
            async with asyncio.timeout(STORE_TIMEOUT_SECONDS):
                allowed = await self._limiter.hit(self._limit, principal)
                if allowed:
                    return
                window = await self._limiter.get_window_stats(self._limit, principal)
        except (StorageError, OSError, TimeoutError) as exc:
            logger.warning("rate_limit_unavailable", error=type(exc).__name__)
            return

        # The library's estimate of when the weighted count drops below the
        # limit again; that is when a retry can succeed.
        retry_after = max(1, math.ceil(window.reset_time - time.time()))
        raise RateLimitedError(retry_after)
