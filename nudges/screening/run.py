"""A screening run over an export on disk: shard it, screen every shard, add the counts up.

Two maps over a Runner (cluster.py): input chunks → shard part files, then shards → counts and sorted
worklist rows. Every count the run reports is a sum over tasks, and every line that did not become a
screened patient is accounted for (invalid lines by file and line, resources without a patient, skipped
patients by reason).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO

from ..fhir import instant
from ..services import Services
from ..tools.progress import Progress
from .cluster import Runner
from .shards import CHUNK_BYTES, ChunkTally, join_medications, plan_chunks, shard_count
from .tasks import Job, ShardResult, screen_shard, shard_chunk

SHARDS_PER_WORKER = 4  # enough tasks that a slow shard does not leave the other workers idle
MIN_CHUNK = 4 * 1024 * 1024


@dataclass
class Tally:
    files: int = 0
    lines: int = 0
    resources: int = 0
    unlinked: int = 0
    unread: int = 0  # resources of patients that no rule of the hook can read: not part of their calls
    invalid: list[str] = field(default_factory=list)  # file:line: why
    shards: int = 0
    medications: int = 0  # Medication resources in the export
    joined: int = 0  # copies given to the patients whose orders name them
    unresolved: int = 0  # references to a Medication the export does not have
    patients: int = 0
    screened: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    cards: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    groups: Counter[tuple[str, str]] = field(default_factory=Counter)
    fired: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    rows: list[str] = field(default_factory=list)  # per shard, in shard order
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # the workers' CPU time screening shards, summed
    shard_cpu_seconds: float = 0.0  # and splitting the input into shards

    def add_chunks(self, tallies: list[ChunkTally]) -> None:
        """Chunk counts, with each invalid line's number counted from the start of its file."""
        offsets: dict[str, int] = {}
        for chunk in sorted(tallies, key=lambda t: (t.chunk.file, t.chunk.part)):
            base = offsets.get(chunk.chunk.path, 0)
            self.invalid += [f"{chunk.chunk.path}:{base + line}: {why}" for line, why in chunk.invalid]
            offsets[chunk.chunk.path] = base + chunk.lines
            self.lines += chunk.lines
            self.resources += chunk.resources
            self.unlinked += chunk.unlinked
            self.unread += chunk.unread
            self.medications += chunk.medications
            self.shard_cpu_seconds += chunk.cpu_seconds
        self.files = len(offsets)

    def add_shards(self, results: list[ShardResult]) -> None:
        for result in sorted(results, key=lambda r: r.shard):
            self.patients += result.patients
            self.screened += result.screened
            self.skipped.update(result.skipped)
            self.cards.update(result.cards)
            self.errors.update(result.errors)
            self.groups.update(result.groups)
            self.fired.update(result.fired)
            self.rows.append(result.rows)
            self.cpu_seconds += result.cpu_seconds


def screen_export(files: list[Path], services: Services, *, rules: Path, site: Path | None, statuses: tuple[str, ...],
                  hook: str, now: datetime, runner: Runner, work: Path, err: TextIO, label: str = "screen") -> Tally:
    """Shard the export into `work`, then screen each shard with the same pipeline as a hook call."""
    tally = Tally()
    started = time.perf_counter()
    files, rules, work = [f.resolve() for f in files], rules.resolve(), work.resolve()  # for workers elsewhere
    site = site.resolve() if site else None
    # Chunks small enough that every worker gets several (type files differ a lot in size), at most 64 MB:
    # the shards' contents do not depend on it (parts are read back in file and position order).
    size = sum(f.stat().st_size for f in files)
    chunks = plan_chunks(files, max(MIN_CHUNK, min(CHUNK_BYTES, size // (SHARDS_PER_WORKER * runner.workers) + 1)))
    shards = shard_count(files, least=SHARDS_PER_WORKER * runner.workers if runner.workers > 1 else 1)
    total_bytes = sum(c.end - c.start for c in chunks)
    job = Job(str(rules), str(site) if site else None, statuses, services.ruleset.digest, hook, instant(now), str(work))
    progress = Progress(total_bytes, "bytes", err, plain=True, delay=0, prefix=f"{label}: reading the export ",
                        counts=False)
    done_bytes, tallies = 0, []
    for _, chunk_tally in runner.map(shard_chunk, chunks, shards=shards, job=job):
        tallies.append(chunk_tally)
        done_bytes += chunk_tally.chunk.end - chunk_tally.chunk.start
        progress.step(done_bytes, f"{sum(t.resources for t in tallies)} resources")
    progress.finish()
    tally.add_chunks(tallies)
    tally.shards = shards
    written = Counter[int]()
    for chunk_tally in tallies:
        written.update(chunk_tally.shard_bytes)
    buckets = sorted(set().union(*(t.buckets for t in tallies)))
    for _, join in runner.map(join_medications, buckets, work=work):
        tally.joined += join.joined
        tally.unresolved += join.unresolved
        written.update(join.shard_bytes)
    tally.seconds["shard"] = time.perf_counter() - started

    started = time.perf_counter()
    present = sorted(written)  # shards no patient hashed to have no folder and no task
    progress = Progress(sum(written.values()), "bytes", err, plain=True, delay=0, prefix=f"{label}: screening ",
                        counts=False)
    done_bytes, patients, results = 0, 0, []
    for _, result in runner.map(screen_shard, present, job=job):
        results.append(result)
        done_bytes += written[result.shard]
        patients += result.patients
        progress.step(done_bytes, f"{patients} patients, {len(results)}/{len(present)} shards")
    progress.finish()
    tally.add_shards(results)
    tally.seconds["screen"] = time.perf_counter() - started
    return tally
