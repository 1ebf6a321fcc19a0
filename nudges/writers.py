"""The hook call's write connections on PostgreSQL: psycopg's own asyncio pool, in autocommit.

Why: the write is one statement (showing.py), atomic by itself, so BEGIN and COMMIT would only be two
more round trips; and awaited on the event loop it needs no worker thread, which had slept and woken for
each round trip while the GIL changed hands (README "Performance"). A pool of its own, opened on the loop
that uses it, with at most SIZE connections per process: with one per call in flight (SQLAlchemy's
asyncio engine gave each its own), PostgreSQL's CPU per call doubled under 16 clients and the p99 rose.
A connection idle for longer than the store's ping threshold is pinged before use, as in the threads' pool.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

SIZE = 4
T = TypeVar("T")


class Writers:
    def __init__(self, url: URL, ping_after: Callable[[], float], wait: Callable[[], float],
                 connect_timeout: int) -> None:
        self.conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.ping_after = ping_after  # seconds idle, read at each checkout (tests change it)
        self.wait = wait  # seconds a call waits for a connection before it is a 503 (read when the pool opens)
        self.connect_timeout = connect_timeout
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._stale = False  # a call found no connection: the next call opens a fresh pool
        self._closing: set[asyncio.Future[None]] = set()  # pools replaced so, closing in the background
        self._opening = asyncio.Lock()
        self._idle_from: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    async def pool(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        if self._pool is not None and not self._stale:
            return self._pool
        async with self._opening:  # the first calls after a start (or an outage) arrive together
            if self._stale and self._pool is not None:
                # psycopg_pool retries a lost server with a doubling pause (1, 2, 4 … s): after a
                # minute's outage the database had been back for half a minute before hook calls were
                # (while /readyz, on the other pool, said ready). A fresh pool connects at once.
                old, self._pool, self._stale = self._pool, None, False
                closing = asyncio.ensure_future(old.close())  # connections in use close as they come back
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            if self._pool is None:
                pool = AsyncConnectionPool(self.conninfo, min_size=1, max_size=SIZE,
                                           kwargs={"autocommit": True, "connect_timeout": self.connect_timeout},
                                           open=False, check=self._ping_if_idle, reset=self._returned,
                                           name="nudges-hook-writes", timeout=self.wait())
                await pool.open()
                self._pool = pool
        return self._pool

    async def retrying(self, work: Callable[[], Awaitable[T]]) -> T:
        """Store.retrying for work on these connections: once more when the database dropped the one it
        had. A connection seldom drops alone (a restart, a failover), so the pool's idle connections are
        checked, the dead ones replaced, before the second try."""
        async def attempt() -> T:
            try:
                return await work()
            except PoolTimeout:  # no connection in time: the next call opens a fresh pool (see pool())
                self._stale = True
                raise

        try:
            return await attempt()
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        if self._pool is not None:
            await self._pool.check()
        return await attempt()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        for closing in list(self._closing):
            await closing

    async def _returned(self, connection: AsyncConnection[Any]) -> None:
        self._idle_from[connection] = time.monotonic()

    async def _ping_if_idle(self, connection: AsyncConnection[Any]) -> None:
        """psycopg_pool's check: an error here makes the pool replace the connection."""
        since = self._idle_from.get(connection)
        if since is not None and time.monotonic() - since >= self.ping_after():
            await connection.execute("SELECT 1")
