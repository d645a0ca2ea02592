"""A LISTEN connection kept open: notifications in, reconnects with back-off.

The relay listens on the outbox's channel, which wakes it when rows are
inserted. Those notifications only make it prompt; they never carry data and
nothing depends on receiving every one. PostgreSQL sends them at commit, one
per inserting statement. While this connection is down the relay still
polls, so a dead LISTEN or a lost notification delays rows by at most the
poll interval.

The API listens the same way for changed API keys (``service.key_cache``);
it needs to know when it is *not* listening, which ``on_lost`` tells.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from outbox_relay import queries
from outbox_relay.config import asyncpg_dsn
from outbox_relay.errors import DatabaseUnavailableError
from outbox_relay.resilience import DependencyHealth, wait_first
from outbox_relay.store import database_errors

log = structlog.get_logger(__name__)

#: Seconds between round trips that check the connection is really alive; a
#: silently dropped connection would otherwise look like a quiet outbox.
HEALTH_CHECK_INTERVAL = 30.0

#: Seconds to wait for connecting or for one health check.
CONNECT_TIMEOUT = 10.0


class NotificationListener:
    """Keeps one connection listening on ``channel``.

    ``on_notify`` gets each notification's payload. ``on_listening`` is
    called once the connection listens, after every (re)connection:
    notifications sent while nobody listened reached no one, so a caller
    must assume it missed some. ``on_lost`` is called when a connection that
    listened is gone (or closed on stop). The callbacks run on the event
    loop and must not block.
    """

    def __init__(
        self,
        database_url: str,
        application_name: str,
        channel: str,
        *,
        on_notify: Callable[[str], None],
        on_listening: Callable[[], None],
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._application_name = application_name
        self._channel = channel
        self._on_notify_payload = on_notify
        self._on_listening = on_listening
        self._on_lost = on_lost
        self._health = DependencyHealth("listen")

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until ``stop`` is set, reconnecting with back-off."""
        while not stop.is_set():
            try:
                await self._listen(stop)
            except DatabaseUnavailableError as exc:
                delay = self._health.down(exc)
            except Exception as exc:
                # Not a lost connection but a fault; polling keeps rows
                # moving meanwhile, so report it loudly and try again.
                log.exception("outbox_listen_failed")
                delay = self._health.down(exc)
            else:
                return  # _listen only returns once stop is set
            await wait_first(stop.wait(), at_most=delay)

    async def _listen(self, stop: asyncio.Event) -> None:
        """One connection's life: connect, listen, return on ``stop``."""
        lost = asyncio.Event()
        conn = await self._connect(lost)
        try:
            self._health.up()
            self._on_listening()
            await self._watch(conn, lost, stop)
        finally:
            self._on_lost()
            await self._close(conn)

    async def _connect(self, lost: asyncio.Event) -> asyncpg.Connection[Any]:
        with database_errors():
            conn: asyncpg.Connection[Any] = await asyncpg.connect(
                self._dsn,
                timeout=CONNECT_TIMEOUT,
                server_settings={"application_name": self._application_name},
            )
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            with database_errors():
                await conn.add_listener(self._channel, self._on_notify)
        except BaseException:
            await self._close(conn)
            raise
        return conn

    async def _watch(
        self, conn: asyncpg.Connection[Any], lost: asyncio.Event, stop: asyncio.Event
    ) -> None:
        """Return on ``stop``; raise ``DatabaseUnavailableError`` on loss."""
        while True:
            await wait_first(stop.wait(), lost.wait(), at_most=HEALTH_CHECK_INTERVAL)
            if stop.is_set():
                return
            if lost.is_set() or conn.is_closed():
                raise DatabaseUnavailableError("LISTEN connection closed")

            with database_errors():
                await conn.execute(queries.PING, timeout=CONNECT_TIMEOUT)

    def _on_notify(
        self,
        conn: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any],
        pid: int,
        channel: str,
        payload: object,
    ) -> None:
        self._on_notify_payload(str(payload))

    async def _close(self, conn: asyncpg.Connection[Any]) -> None:
        if conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            # Closing politely failed; drop the socket, the server cleans up.
            conn.terminate()
