"""Alembic migrations, applied automatically at start-up (and by tests) through `upgrade`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade to `revision`; on PostgreSQL an advisory lock serialises replicas starting together."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(727274)"))
            try:
                config = alembic_config(engine)
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(727274)"))
                conn.commit()
        return
    with engine.connect() as conn:
        # SQLite: the upgrade in one write transaction taken at once, so the processes of `nudges serve
        # --workers N` starting together on a new database wait for each other (the busy timeout, made
        # long for this) instead of both creating the tables: the second had failed with "table meta
        # already exists" and stopped the server. The driver begins a transaction only before a row is
        # written, and left the DDL and alembic's version check outside any.
        from ..store import SQLITE_BUSY_MS

        conn.exec_driver_sql(f"PRAGMA busy_timeout={MIGRATION_WAIT_MS}")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            config = alembic_config(engine)
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            conn.commit()
        finally:
            conn.rollback()  # a no-op after the commit
            conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")


MIGRATION_WAIT_MS = 120_000  # how long a process waits for another's migration of the same SQLite file
