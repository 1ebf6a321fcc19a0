"""The one scheduler: APScheduler 3's asyncio scheduler on the app's event loop, running every periodic
job of a replica (rule reload, due follow-ups).

Its jobs live in APScheduler's in-memory job store on purpose: APScheduler 3 job stores must never be
shared between schedulers, and every replica runs the same jobs against the same database. What must
survive a restart (follow-ups, waiting cards) is in the database, and the row claims
(SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL) are what make replicas safe.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC

from apscheduler.schedulers.asyncio import AsyncIOScheduler

log = logging.getLogger("nudges.scheduler")

Job = Callable[[], Awaitable[object]]


class Scheduler:
    def __init__(self) -> None:
        self._jobs: list[tuple[str, float, Job]] = []
        self._scheduler: AsyncIOScheduler | None = None

    def every(self, name: str, seconds: float, job: Job) -> None:
        """Run `job` every `seconds` (0 or less: never); one run at a time, missed runs coalesced."""
        if seconds > 0:
            self._jobs.append((name, seconds, job))

    def start(self) -> None:
        """Start on the running event loop (call from the app's lifespan)."""
        if self._scheduler is not None or not self._jobs:
            return
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # not a line per run every few seconds
        logging.getLogger("apscheduler.scheduler").addFilter(_still_running)
        scheduler = AsyncIOScheduler(timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1,
                                                                 "misfire_grace_time": None})
        for name, seconds, job in self._jobs:
            scheduler.add_job(_guarded(name, job), "interval", seconds=seconds, id=name, replace_existing=True)
        scheduler.start()
        self._scheduler = scheduler

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None


def _guarded(name: str, job: Job) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        try:
            await job()
        except Exception:  # a job that dies silently would freeze the rule set or strand follow-ups
            log.exception("scheduled job failed", extra={"job": name})

    return run


def _still_running(record: logging.LogRecord) -> bool:
    """Drop apscheduler's "skipped: maximum number of running instances reached": a long run (a large
    rule set reloading) is meant to make the next runs wait (max_instances 1), and the warning, every
    interval and naming an inner function, read as a fault."""
    return "maximum number of running instances reached" not in record.getMessage()
