"""The principals of recently checked API keys, forgotten as soon as keys change.

Every request under ``/api/v1`` presents a key. Looking it up costs a pooled
connection and a round trip, more than the rest of the check; so the API
remembers the principal of each key it found live, for at most
``API_KEY_CACHE_SECONDS``.

A revocation still takes effect at once, on every replica: every statement
that changes ``api_keys`` sends a notification when it commits (migration
0008), and each API process listens for it and empties its cache. The cache
answers only while that LISTEN connection is up; while it is down (the
database restarted, the connection broke) every request looks its key up
again, and the cache starts empty once it is back, since notifications sent
in between reached nobody. What is left is a notification in flight: a
request that arrives in the milliseconds between the commit and the
notification's arrival still passes. A connection that dies without the
process noticing is caught by the listener's health check; until then,
entries expire after their time.

Only live keys are kept. An unknown, malformed or revoked key is looked up
every time, as before, so guessing keys costs the guesser a lookup each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from outbox_relay.listener import NotificationListener
from service.api_keys import Principal, hash_key

#: The channel migration 0008's trigger notifies on.
CHANGED_CHANNEL = "api_keys_changed"

#: Seconds the listener gets to close its connection on shut-down.
STOP_SECONDS = 5.0

#: Keys kept at most; beyond it the oldest entry makes room. Far more than a
#: deployment has principals calling at once, few enough to stay small.
MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class _Entry:
    key_hash: str
    principal: Principal
    expires_at: float


class ApiKeyCache:
    """Principals by key id, trusted only while keys' changes are heard.

    Use: :meth:`principal` for a presented key; on a miss, take
    :attr:`generation`, look the key up, and :meth:`remember` the result with
    that generation. An entry is only stored if nothing was forgotten since
    the generation was taken, so a lookup that raced a revocation cannot
    put the revoked key back.
    """

    def __init__(
        self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._listening = False
        #: Moves on every forget; see :meth:`remember`.
        self.generation = 0

    @property
    def ttl_seconds(self) -> float:
        return self._ttl

    @property
    def answering(self) -> bool:
        """Whether entries are used: caching is on and changes are heard."""
        return self._listening and self._ttl > 0

    def principal(self, key_id: str, presented: str) -> Principal | None:
        """The cached principal of key ``presented`` (id ``key_id``), or None."""
        if not self.answering:
            return None
        entry = self._entries.get(key_id)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            del self._entries[key_id]
            return None
        # The same constant-time comparison as against the stored hash.
        if not hmac.compare_digest(entry.key_hash, hash_key(presented)):
            return None
        return entry.principal

    def remember(self, presented: str, principal: Principal, generation: int) -> None:
        """Keep ``principal``, found live for ``presented`` by a lookup that
        started at ``generation``."""
        if not self.answering or generation != self.generation:
            return
        if len(self._entries) >= MAX_ENTRIES:
            # Dicts keep insertion order: the first entry is the oldest.
            del self._entries[next(iter(self._entries))]
        self._entries[principal.key_id] = _Entry(
            key_hash=hash_key(presented),
            principal=principal,
            expires_at=self._clock() + self._ttl,
        )

    def forget_all(self, _payload: str = "") -> None:
        """Drop every entry: some key changed (or may have, unheard)."""
        self._entries.clear()
        self.generation += 1

    def listening(self) -> None:
        """The LISTEN connection is up: answer from here on, starting empty."""
        self.forget_all()
        self._listening = True

    def deaf(self) -> None:
        """The LISTEN connection is gone: answer nothing until it is back."""
        self._listening = False
        self.forget_all()


@contextlib.asynccontextmanager
async def listening_for_key_changes(
    cache: ApiKeyCache, database_url: str
) -> AsyncIterator[None]:
    """Keep ``cache`` told of key changes for the duration of the block.

    With caching off (a time of 0) nothing listens and the cache never
    answers.
    """
    if cache.ttl_seconds == 0:
        yield
        return

    stop = asyncio.Event()
    listener = NotificationListener(
        database_url,
        "outbox-tasks-api listen",
        CHANGED_CHANNEL,
        on_notify=cache.forget_all,
        on_listening=cache.listening,
        on_lost=cache.deaf,
    )
    # The listener reconnects by itself and only returns once told to stop.
    task = asyncio.create_task(listener.run(stop), name="api-key-cache-listen")
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait([task], timeout=STOP_SECONDS)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        cache.deaf()
