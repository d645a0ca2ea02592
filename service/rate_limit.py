"""Each principal's request rate, counted in Redis so it holds across replicas.

The counter is a sliding window counter (the ``limits`` library): the count
of the current minute plus the previous minute's, weighted by how much of it
still lies in the last 60 seconds. That avoids the double burst a fixed
window allows at its edges, and costs one O(1) script in Redis per call
whatever N is; a moving window keeps one list entry per request and walks it,
which gets slower the higher the limit. Every API replica points at the same
Redis, so a principal gets N per minute in all, not N per replica.

One call per request would cost the API more than the rest of a request's
checks together, so a principal's concurrent requests share calls: while one
call is in flight, the principal's requests that arrive meanwhile wait for it
and then go to Redis as one hit of their number (``cost``). The script admits
such a hit only if all of it fits; when it does not, its requests are counted
one by one, in arrival order, until one is refused, so exactly as many are
admitted as separate calls would have admitted. A lone request goes at once,
as before; a request in a burst waits for at most one call ahead of its own.

When Redis cannot be reached the request goes through (fail open) and a
WARNING is logged: the limit protects capacity, and refusing every request
because the limiter is down would turn a Redis outage into an API outage.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import structlog
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from service.errors import RateLimitedError
from service.settings import ServiceSettings, check_redis_url

#: Longest a group of requests waits for Redis before it is let through
#: unchecked.
STORE_TIMEOUT_SECONDS = 1.0

logger = structlog.get_logger(__name__)


def async_storage_url(url: str) -> str:
    """``redis://…`` as the ``limits`` library names its asyncio Redis storage."""
    check_redis_url(url)
    return f"async+{url}"


@dataclass
class _Verdict:
    """What Redis said about a group: its first ``admitted`` requests pass."""

    admitted: int = 0
    #: Seconds until a refused request may succeed.
    retry_after: int = 1
    #: Why Redis could not be asked; every request of the group passes.
    unavailable: BaseException | None = None


@dataclass
class _Group:
    """Requests of one principal counted by one call, in arrival order."""

    size: int = 0
    verdict: asyncio.Future[_Verdict] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class PrincipalRateLimiter:
    """About ``per_minute`` requests per principal in any 60 seconds."""

    def __init__(self, storage_url: str, per_minute: int, key_prefix: str) -> None:
        self._limit = RateLimitItemPerMinute(per_minute)
        self._storage = RedisStorage(
            async_storage_url(storage_url),
            wrap_exceptions=True,
            key_prefix=key_prefix,
            # redis-py with the hiredis parser: the same script in Redis for
            # about a third of coredis' CPU per call in this process.
            implementation="redispy",
            socket_connect_timeout=STORE_TIMEOUT_SECONDS,
            socket_timeout=STORE_TIMEOUT_SECONDS,
        )
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        #: Principals with a call in flight, and the group that waits for it
        #: (None while nobody does).
        self._waiting: dict[str, _Group | None] = {}
        #: The calls in flight, kept so that none is collected unfinished.
        self._calls: set[asyncio.Task[None]] = set()

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
        if principal in self._waiting:
            group = self._waiting[principal]
            if group is None:
                group = self._waiting[principal] = _Group()
        else:
            group = _Group()
            self._start(principal, group)
        position = group.size
        group.size += 1

        # Shielded: a request whose client went away still counted, and its
        # group's call must not be cancelled with it.
        verdict = await asyncio.shield(group.verdict)
        if verdict.unavailable is not None:
            logger.warning(
                "rate_limit_unavailable", error=type(verdict.unavailable).__name__
            )
            return
        if position >= verdict.admitted:
            raise RateLimitedError(verdict.retry_after)

    def _start(self, principal: str, group: _Group) -> None:
        self._waiting[principal] = None
        call = asyncio.create_task(
            self._count(principal, group), name=f"rate-limit:{principal}"
        )
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

    async def _count(self, principal: str, group: _Group) -> None:
        """Ask Redis about ``group``, then start the group that formed meanwhile.

        ``group`` takes no members once started: requests arriving from then
        on form the next group.
        """
        try:
            verdict = await self._verdict(principal, group)
        except BaseException as exc:
            # A bug, or the loop is closing: nobody waits for ever.
            group.verdict.set_exception(exc)
            raise
        finally:
            following = self._waiting.pop(principal, None)
            if following is not None:
                self._start(principal, following)
        group.verdict.set_result(verdict)

    async def _verdict(self, principal: str, group: _Group) -> _Verdict:
        try:
            async with asyncio.timeout(STORE_TIMEOUT_SECONDS):
                size = group.size
                if await self._limiter.hit(self._limit, principal, cost=size):
                    return _Verdict(admitted=size)

                # Not all of them fit: as many as separate calls would admit.
                admitted = 0
                while size > 1 and admitted < size:
                    if not await self._limiter.hit(self._limit, principal):
                        break
                    admitted += 1
                window = await self._limiter.get_window_stats(self._limit, principal)
        except (StorageError, OSError, TimeoutError) as exc:
            return _Verdict(unavailable=exc)

        # The library's estimate of when the weighted count drops below the
        # limit again; that is when a retry can succeed.
        retry_after = max(1, math.ceil(window.reset_time - time.time()))
        return _Verdict(admitted=admitted, retry_after=retry_after)
