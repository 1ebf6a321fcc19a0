"""The hook call's write connections: on PostgreSQL psycopg's own asyncio pool, in autocommit; on SQLite
one DBAPI connection the process holds (HeldSqlite).

Why, on PostgreSQL: the write is one statement (showing.py), atomic by itself, so BEGIN and COMMIT would only be two
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import PoolProxiedConnection

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
                                           open=False, check=self._ping_if_idle,
                                           name="nudges-hook-writes", timeout=self.wait())
                await pool.open()
                self._pool = pool
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection of the pool for one write. When it fell idle is noted here, for the ping check,
        and not by a `reset` callback of the pool's: with one, the pool hands every returned connection to
        one of its worker tasks, a hop through the loop on every call, and the connection is back for
        the next call only once that worker has run."""
        async with (await self.pool()).connection() as connection:
            try:
                yield connection
            finally:
                self._idle_from[connection] = time.monotonic()

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

    async def _ping_if_idle(self, connection: AsyncConnection[Any]) -> None:
        """psycopg_pool's check: an error here makes the pool replace the connection."""
        since = self._idle_from.get(connection)
        if since is not None and time.monotonic() - since >= self.ping_after():
            await connection.execute("SELECT 1")


class HeldSqlite:
    """SQLite: the hook call's write (showing.py) on one connection of the engine's pool that the process
    holds, its transaction committed on the DBAPI connection itself. SQLite answers in-process, so what a
    write cost beyond SQLite's own work was SQLAlchemy's: a pool checkout and check-in (with its reset), a
    Connection and its transaction objects, for a claim, a card insert and a look-up that take SQLite a
    few hundredths of a millisecond each: 8–12 % of a 50-resource call's CPU (README "Performance").

    Used on the event loop only, one transaction at a time (the write has no await inside). It is the
    driver's transaction as SQLAlchemy runs it on SQLite (pysqlite begins before the first write), with the
    same connection set-up (the engine's connect event: WAL, busy timeout) and the same errors: a driver
    error is SQLAlchemy's DBAPIError (api/errors.py answers a locked or unreachable database with 503), and
    a connection found unusable is invalidated, so the next write takes a fresh one."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._fairy: PoolProxiedConnection | None = None

    @property
    def connection(self) -> PoolProxiedConnection:
        """The held connection (Prepared runs its statements on it, as on a SQLAlchemy Connection's)."""
        if self._fairy is None:
            self._fairy = self.engine.raw_connection()
        return self._fairy

    def invalidate(self, exception: BaseException | None = None) -> None:
        fairy, self._fairy = self._fairy, None
        if fairy is not None:
            fairy.invalidate(exception)

    @contextmanager
    def transaction(self) -> Iterator[HeldSqlite]:
        dbapi = self.connection.dbapi_connection
        assert dbapi is not None
        dialect = self.engine.dialect
        try:
            yield self
            dbapi.commit()
        except dialect.loaded_dbapi.Error as exc:  # the commit's, or a cursor's (Prepared raises DBAPIError)
            gone = self._abandon(dbapi, exc, dialect.is_disconnect(exc, dbapi, None))
            raise DBAPIError.instance("COMMIT (hook write)", None, exc, dialect.loaded_dbapi.Error,
                                      connection_invalidated=gone, dialect=dialect) from exc
        except BaseException as exc:
            self._abandon(dbapi, exc, False)
            raise

    def _abandon(self, dbapi: Any, exc: BaseException, gone: bool) -> bool:
        """The transaction rolled back; the connection given up when it is gone or cannot roll back."""
        if not gone:
            try:
                dbapi.rollback()
            except self.engine.dialect.loaded_dbapi.Error:
                gone = True
        if gone:
            self.invalidate(exc)
        return gone

    def close(self) -> None:
        """Back to the pool (whose dispose then closes it)."""
        fairy, self._fairy = self._fairy, None
        if fairy is not None:
            fairy.close()
