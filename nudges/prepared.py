"""The statements on the path of every hook call, compiled once per dialect to the driver's own SQL and
run on the DBAPI cursor of the caller's SQLAlchemy connection, inside its transaction (or, for the hook
write, on a psycopg asyncio connection of writers.py on PostgreSQL and the connection writers.HeldSqlite
holds on SQLite).

Why: for these few small statements SQLAlchemy's work per execute (an execution context, parameters
constructed and processed, a result wrapper) cost more than SQLite's own: a call's suppression claim
and card insert for three cards, with their commit, took 0.30 ms through `Connection.execute` and 0.19 ms
here (README "Performance"). The statements themselves stay SQLAlchemy constructs defined once in store.py
for both databases; only how they are executed is lowered, with SQLAlchemy's own bind processors (the
datetime format SQLite stores) and its error handling (a dropped connection is invalidated and raised as
`DBAPIError` with `connection_invalidated`, which `Store.retrying` relies on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from psycopg import AsyncConnection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class DriverConnection(Protocol):
    """What a statement runs on: a SQLAlchemy Connection in its transaction, or the connection SQLite's
    hook write holds (writers.HeldSqlite). Both give the pooled DBAPI connection, and invalidate it."""

    @property
    def connection(self) -> Any: ...

    def invalidate(self, exception: BaseException | None = None) -> None: ...


class Prepared:
    """One statement for one dialect: its SQL, the order of its parameters (positional drivers) and what
    each needs done to it before the driver sees it; literal values in the statement (a LIMIT, a fixed
    comparison) are filled in from the statement itself."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.dialect = dialect
        self.sql = compiled.string
        self.order: Sequence[str] | None = compiled.positiontup  # None for named paramstyles (psycopg)
        self.processors: dict[str, Callable[[Any], Any]] = {}
        self.fixed: dict[str, Any] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors[name] = processor
            if not bind.required:
                self.fixed[name] = processor(bind.value) if processor else bind.value
        self.named = [name for name in compiled.binds if name not in self.fixed]

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """`values` by bind name (every required one, a KeyError naming it otherwise) as the driver takes them."""
        merged = dict(self.fixed)
        processors = self.processors
        for name in self.named:
            value = values[name]
            merged[name] = processors[name](value) if name in processors else value
        return [merged[name] for name in self.order] if self.order is not None else merged

    def rows(self, conn: DriverConnection, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run it once; the rows it returns (none for a statement without RETURNING)."""
        parameters = self.parameters(values)
        return self._run(conn, parameters, lambda cursor: cursor.execute(self.sql, parameters))

    def many(self, conn: DriverConnection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run it once per row of parameters, in one driver call."""
        if rows:
            parameters = [self.parameters(row) for row in rows]
            self._run(conn, parameters, lambda cursor: cursor.executemany(self.sql, parameters))

    async def rows_async(self, connection: AsyncConnection[Any], values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """`rows` on a psycopg asyncio connection (writers.py), with SQLAlchemy's error for a driver
        error: a connection the database dropped says `connection_invalidated` (Writers.retrying), and
        psycopg's pool replaces it when it comes back."""
        parameters = self.parameters(values)
        try:
            cursor = await connection.execute(self.sql, parameters)
            return [tuple(row) for row in await cursor.fetchall()] if cursor.description else []
        except self.dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(self.sql, parameters, exc, self.dialect.loaded_dbapi.Error,
                                      connection_invalidated=connection.broken or connection.closed,
                                      dialect=self.dialect) from exc

    def _run(self, conn: DriverConnection, parameters: Any, execute: Callable[[Any], Any]) -> list[tuple[Any, ...]]:
        fairy = conn.connection  # the pooled DBAPI connection of this transaction
        cursor = fairy.cursor()
        try:
            execute(cursor)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
        except self.dialect.loaded_dbapi.Error as exc:
            gone = self.dialect.is_disconnect(exc, fairy.dbapi_connection, cursor)
            if gone:
                conn.invalidate(exc)
            raise DBAPIError.instance(self.sql, parameters, exc, self.dialect.loaded_dbapi.Error,
                                      connection_invalidated=gone, dialect=self.dialect) from exc
        finally:
            cursor.close()
