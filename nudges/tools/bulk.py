"""`nudges replay` over a FHIR Bulk Data export (NDJSON): every patient through the service pipeline, in this
process. The same code as `nudges screen` (nudges/screening: shards on disk in a temporary folder, then
each shard screened patient by patient), run without a cluster and printing only the per-rule counts.
"""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path
from typing import TextIO

from ..fhir import instant
from ..screening.cluster import InProcess
from ..screening.outputs import report
from ..screening.run import Tally, screen_export
from ..screening.tasks import Job, remember
from ..services import Services
from ..settings import Settings


def replay_bulk(files: list[Path], services: Services, settings: Settings, hook: str, now: datetime,
                out: TextIO, err: TextIO) -> Tally:
    """Evaluate every patient in the export and print per-rule card counts."""
    statuses = tuple(settings.rule_statuses)
    site = settings.site_valuesets
    remember(Job(str(settings.rules), str(site) if site else None, statuses, services.ruleset.digest, hook,
                 instant(now), ""), services)
    with tempfile.TemporaryDirectory(prefix="nudges-replay-") as folder:
        tally = screen_export(files, services, rules=settings.rules, site=site, statuses=statuses, hook=hook,
                              now=now, runner=InProcess(), work=Path(folder), err=err, label="replay")
    report(tally, services.for_hook(hook), now, out)
    return tally
