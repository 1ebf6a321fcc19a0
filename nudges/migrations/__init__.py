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
    """Upgrade to `revision`, serialised across processes starting together (the replicas of a
    deployment, the workers of `nudges serve --workers N`): the first migrates, the others wait and find
    nothing to do.

    PostgreSQL: an advisory lock. SQLite: the upgrade in one write transaction taken at its start, the
    others waiting in the busy timeout (made long for this). The driver begins a transaction only before
    a row is written, so alembic's DDL and version check had run outside any: two workers on a new
    database both created the tables, the second failed ("table meta already exists"), and the server
    stopped."""
    from ..store import SQLITE_BUSY_MS

    postgres = engine.dialect.name == "postgresql"
    serialise, release = (("SELECT pg_advisory_lock(727274)", "SELECT pg_advisory_unlock(727274)") if postgres
                          else (f"PRAGMA busy_timeout={MIGRATION_WAIT_MS}", f"PRAGMA busy_timeout={SQLITE_BUSY_MS}"))
    with engine.connect() as conn:
        conn.execute(text(serialise))
        if not postgres:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            config = alembic_config(engine)
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            conn.commit()
        finally:
            conn.rollback()  # nothing to roll back after the commit
            conn.execute(text(release))
            conn.commit()


MIGRATION_WAIT_MS = 120_000  # how long a process waits for another's migration of the same SQLite file
