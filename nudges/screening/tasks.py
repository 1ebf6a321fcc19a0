"""What a worker runs: split an input chunk into shards, screen a shard. Plain functions of plain,
picklable arguments, so the same code runs in this process (`nudges replay export/`) or on any Dask
worker, local or on a cluster (which then needs nudges installed and the work folder and rules on a
shared file system).

A worker loads the rule set itself, once per process, and refuses to screen with a rule set whose digest
is not the one the run started with (the files changed meanwhile, or a node sees other files).
"""

from __future__ import annotations

import gc
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..clock import parse_instant
from ..planned import Heads
from ..services import Services
from ..tools.audit import DIMENSIONS
from .calls import Fired, screen_patient
from .shards import Chunk, ChunkTally, Sieve, read_shard, shard_folder, split_chunk


class ScreenError(Exception):
    """A run that cannot go on: unreadable input, a rule set that does not load or changed, a failed task."""


@dataclass(frozen=True)
class Job:
    """Everything a shard task needs, as plain values."""

    rules: str
    site: str | None
    statuses: tuple[str, ...]
    digest: str  # the rule set the run started with
    hook: str
    now: str
    work: str


@dataclass
class ShardResult:
    """A shard's counts; its worklist rows are in `rows` (NDJSON, sorted by rule then patient), and the
    patients it skipped, with the reason, in `rows` with the suffix `.skipped` (sorted by patient)."""

    shard: int
    patients: int = 0
    screened: int = 0
    resources: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    cards: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    groups: Counter[tuple[str, str]] = field(default_factory=Counter)  # (dimension, group) -> screened
    fired: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (rule, dimension, group) -> patients
    rows: str = ""
    cpu_seconds: float = 0.0  # the worker's own CPU time for the shard (a loaded machine slows the wall clock)


_loaded: dict[tuple[str, str | None, tuple[str, ...]], Services] = {}


def remember(job: Job, services: Services) -> None:
    """Hand this process's already loaded rule set to tasks run here (replay runs them in process)."""
    _loaded[(job.rules, job.site, job.statuses)] = services


def services_for(job: Job) -> Services:
    """The rule set, loaded once per worker process and checked against the run's digest."""
    key = (job.rules, job.site, job.statuses)
    services = _loaded.get(key)
    if services is None:
        from ..heap import settle_heap
        from ..rules.compiler import load_ruleset

        result = load_ruleset(Path(job.rules), Path(job.site) if job.site else None)
        if result.ruleset is None:
            raise ScreenError(f"the rule set in {job.rules} does not load on this worker "
                              f"({len(result.problems)} problem(s); run nudges lint there)")
        services = _loaded[key] = Services.build(result.ruleset, frozenset(job.statuses))
        settle_heap()  # the rules stay for the process: out of the collector's sight
    if services.ruleset.digest != job.digest:
        raise ScreenError(f"the rule set in {job.rules} is not the one this run started with "
                          "(edited meanwhile, or another copy on this node)")
    return services


class _Also:
    """A sieve that keeps a type besides what the plan reads: encounter hooks need the patient's
    encounters whatever the rules read of them (the call's context names the latest)."""

    def __init__(self, heads: Heads, kind: str) -> None:
        self.heads, self.kind = heads, kind

    def decode_line(self, data: bytes) -> tuple[str, Any, bool] | None:
        decoded = self.heads.decode_line(data)
        if decoded is None or decoded[2] or decoded[0] != self.kind:
            return decoded
        return decoded[0], decoded[1], True

    def reads_json(self, data: bytes, kind: str) -> bool:
        return kind == self.kind or self.heads.reads_json(data, kind)


def shard_chunk(chunk: Chunk, shards: int, job: Job) -> ChunkTally:
    """Split one input chunk into the shards, leaving out what no rule of the hook can read."""
    service = services_for(job).for_hook(job.hook)
    heads = service.index.heads
    sieve: Sieve = _Also(heads, "Encounter") if service.hook.has_encounter else heads
    return split_chunk(chunk, shards, Path(job.work), sieve)


def rows_path(work: Path, shard: int) -> Path:
    return work / "results" / f"{shard:05d}.rows"


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: a retried task replaces its file, never appends to it."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def row(fired: Fired) -> bytes:
    return orjson.dumps([fired.rule, fired.patient, fired.indicator, fired.summary, fired.evidence])


def screen_shard(shard: int, job: Job) -> ShardResult:
    """Screen every patient of one shard, in patient order; write its rows sorted, return its counts.

    The collector is paused while a shard is screened: parsed resources are acyclic and freed by
    reference counting, and a collection would only walk them."""
    services = services_for(job)
    cpu = time.process_time()
    service = services.for_hook(job.hook)
    now = parse_instant(job.now)
    work = Path(job.work)
    result = ShardResult(shard)
    fired: list[Fired] = []
    skipped: list[bytes] = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for pid, lines in read_shard(shard_folder(work, shard)):
            result.patients += 1
            result.resources += len(lines)
            outcome = screen_patient(services, service, pid, [orjson.loads(line) for line in lines], now)
            if outcome.skipped is not None:
                result.skipped[outcome.skipped] += 1
                skipped.append(orjson.dumps([pid, outcome.skipped]) + b"\n")
                continue
            result.screened += 1
            result.errors.update(outcome.failed)
            bucket: Any = outcome.bucket
            groups = [(d, getattr(bucket, d)) for d in DIMENSIONS]
            result.groups.update(groups)
            for card in outcome.fired:
                result.cards[card.rule] += 1
                result.fired.update((card.rule, d, g) for d, g in groups)
                fired.append(card)
    finally:
        if was_enabled:
            gc.enable()
    fired.sort(key=Fired.key)
    path = rows_path(work, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, b"".join(row(f) + b"\n" for f in fired))
    _write(path.with_name(path.name + ".skipped"), b"".join(skipped))  # patient order: the shard's own
    result.rows = str(path)
    result.cpu_seconds = time.process_time() - cpu
    return result
