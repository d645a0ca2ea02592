"""The LISTEN connection that wakes the relay when rows are inserted.

Notifications only make the relay prompt; they never carry data and nothing
depends on receiving every one. PostgreSQL sends them at commit, one per
inserting statement. While this connection is down the relay still polls, so
a dead LISTEN or a lost notification delays rows by at most the poll interval.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog

from outbox_relay import queries
from outbox_relay.config import asyncpg_dsn
from outbox_relay.errors import DatabaseUnavailableError
from outbox_relay.outbox import NOTIFY_CHANNEL
from outbox_relay.resilience import DependencyHealth, wait_first
from outbox_relay.store import database_errors

log = structlog.get_logger(__name__)

#: Seconds between round trips that check the connection is really alive; a
#: silently dropped connection would otherwise look like a quiet outbox.
HEALTH_CHECK_INTERVAL = 30.0

#: Seconds to wait for connecting or for one health check.
CONNECT_TIMEOUT = 10.0


class NotificationListener:
    """Keeps one connection listening on the outbox channel; sets ``wakeup``.

    ``wakeup`` is also set after every (re)connection: rows inserted while
    nobody listened sent their notifications to no one.
    """

    def __init__(
        self, database_url: str, relay_name: str, wakeup: asyncio.Event
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._application_name = f"outbox_relay listen {relay_name}"
        self._wakeup = wakeup
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
            self._wakeup.set()
            await self._watch(conn, lost, stop)
        finally:
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
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
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
        self._wakeup.set()

    async def _close(self, conn: asyncpg.Connection[Any]) -> None:
        if conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            # Closing politely failed; drop the socket, the server cleans up.
            conn.terminate()
