"""`nudges screen`: from an export folder or a FHIR server's `$export` to worklists and the equity view.

Patient ids are written only under `--out` (the worklists a navigator needs, and the skipped patients);
standard output carries counts and, without `--out`, the suppressed equity view. The shards, which hold
the whole export, live in a work folder that is removed at the end (inside `--out` when given, so
patient data stays where the user put it; `--work` for a folder every cluster node can read).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson

from ..clock import parse_instant
from ..errors import NudgesError
from ..fhir import MEDICATION_TYPES, instant
from ..services import Service, Services
from ..settings import Settings, load_settings
from .cluster import DaskRunner, InProcess, Runner
from .lists import ListWriteError
from .outputs import (
    equity_rows,
    firings,
    merged,
    print_equity,
    report,
    skipped,
    summary,
    write_equity,
    write_worklists,
)
from .run import Tally, screen_export
from .shards import ExportError, export_files
from .source import ExportFailed
from .tasks import ScreenError


@dataclass(frozen=True)
class Options:
    source: str
    now: str
    hook: str = "patient-view"
    workers: int | None = None
    scheduler: str | None = None
    out: Path | None = None
    rules: Path | None = None
    config: Path | None = None
    download: Path | None = None
    level: str = "patient"
    group: str | None = None
    types: tuple[str, ...] = ()
    since: str | None = None
    fresh: bool = False
    export_timeout: float = 3600.0
    lists: bool = False
    work: Path | None = None
    in_process: bool = False  # no cluster (tests and tiny exports)


def is_url(source: str) -> bool:
    return bool(re.match(r"^https?://", source))


def export_types(service: Service) -> tuple[str, ...]:
    """What `_type` asks for by default: the types the hook's rules read, the patient and their coverage,
    and Medication when orders may name theirs by reference."""
    kinds = {re.split(r"[/?]", t, maxsplit=1)[0] for t in service.plan.templates.values()} | {"Patient", "Coverage"}
    if kinds & MEDICATION_TYPES:
        kinds.add("Medication")
    return tuple(sorted(kinds))


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _files(options: Options, settings: Settings, service: Service, err: TextIO) -> tuple[list[Path], list[str]]:
    """The NDJSON files to screen (downloaded first when the source is a server) and notes for the report."""
    if not is_url(options.source):
        return export_files(Path(options.source)), []
    from ..fhirserver.guard import check_server
    from .source import Exporter, ExportRequest

    base = check_server(options.source, settings)
    folder = options.download or (options.out / "export" if options.out else None)
    if folder is None:
        raise ScreenError("a FHIR server source is downloaded before it is screened, and its files hold patient "
                          "data: name the folder with --download DIR (or --out DIR, to use DIR/export)")
    since = instant(parse_instant(options.since)) if options.since else None
    request = ExportRequest(base, "group" if options.group else options.level, options.group,
                            options.types or export_types(service), since)
    exporter = Exporter(settings, folder, err, options.export_timeout)
    files = exporter.run(request, options.fresh)
    return files, exporter.notes + partial_notes(request, export_types(service))


def partial_notes(request: Any, read: tuple[str, ...]) -> list[str]:
    """What an export leaves out of the records the rules read, said where the counts are (stdout and
    summary.json): a rule that fires on an absence (no screening test, no referral) fires wrongly on a
    record cut short, and nothing in the data shows it."""
    notes = []
    left_out = sorted(set(read) - set(request.types))
    if left_out:
        notes.append(f"--type leaves out {', '.join(left_out)}, which the rules read: the records are incomplete, "
                     "and a rule that fires when something is absent may fire wrongly")
    if request.since:
        notes.append(f"--since {request.since}: only what changed since then, so each patient's record is partial "
                     "(a rule that looks back further sees an absence)")
    if request.level != "system" and "Medication" in request.types:
        notes.append("a Patient or Group export carries each patient's compartment, which holds no Medication: an "
                     "order naming its Medication by reference is matched only when the server adds the Medications "
                     "it references (see 'reference(s) to a Medication the export does not have'); --export system "
                     "exports them all")
    return notes


def _write_outputs(tally: Tally, services: Services, service: Service, options: Options, out: Path,
                   notes: list[str]) -> dict[str, int]:
    rules = sorted(r.id for r in service.rules)
    counts = write_worklists(tally, rules, out / "worklists")
    with open(out / "equity.csv", "w", encoding="utf-8", newline="") as stream:
        write_equity(equity_rows(firings(tally, rules)), stream)
    with open(out / "skipped.csv", "w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(("patient_id", "reason"))
        writer.writerows(skipped(tally.rows))
    document = summary(tally, service, services.ruleset.version, instant(parse_instant(options.now)), options.source)
    document["notes"] = notes
    (out / "summary.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
                                       + b"\n")
    return counts


def _lists(tally: Tally, services: Services, service: Service, settings: Settings, options: Options,
           out: TextIO) -> None:
    from .lists import export_scope, worklist, write_lists

    patients: dict[str, list[str]] = {r.id: [] for r in service.rules}
    for row in merged(tally.rows):
        patients.setdefault(row[0], []).append(row[1])
    now = parse_instant(options.now)
    scope = export_scope(options.level, options.group, options.since, options.types)
    resources = [worklist(rule, service.hook.name, now, services.ruleset.version, patients[rule.id], scope)
                 for rule in sorted(service.rules, key=lambda r: r.id)]
    written = write_lists(settings, options.source, resources)
    out.write(f"FHIR List resources written: {len(written)} (one per rule, replaced on a re-run)\n")


def run(options: Options, out: TextIO, err: TextIO) -> int:
    from ..tools.loading import load_services

    try:
        now = parse_instant(options.now)
    except ValueError:
        err.write(f"nudges screen: --now {options.now!r} is not an ISO 8601 instant (2026-03-02T12:00:00Z)\n")
        return 2
    if options.lists and not is_url(options.source):
        err.write("nudges screen: --lists writes to the FHIR server the export came from: give its base URL "
                  "as SOURCE\n")
        return 2
    settings = load_settings(options.config, rules=options.rules)
    services = load_services(settings.rules, settings.rule_statuses, err, settings.site_valuesets)
    if services is None:
        return 1
    service = services.for_hook(options.hook)
    runner: Runner | None = None
    base = options.work or options.out
    work: Path | None = None
    previous = None
    try:
        previous = _stop_on_sigterm()  # before the work folder exists: a stop as it is made still removes it
        try:
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=".nudges-screen-", dir=base))
        except OSError as exc:
            err.write(f"nudges screen: cannot write the work folder in {base or tempfile.gettempdir()}: "
                      f"{exc.strerror or exc} (--out and --work must be folders you can write)\n")
            return 1
        files, notes = _files(options, settings, service, err)
        started = time.perf_counter()
        runner = InProcess() if options.in_process else DaskRunner(
            None if options.scheduler else (options.workers or default_workers()), options.scheduler, work / "dask")
        err.write(f"screen: {len(files)} file(s) on {runner.workers} worker(s)"
                  f"{f' at {options.scheduler}' if options.scheduler else ''}\n")
        tally = screen_export(files, services, rules=settings.rules, site=settings.site_valuesets,
                              statuses=tuple(settings.rule_statuses), hook=options.hook, now=now, runner=runner,
                              work=work, err=err)
        report(tally, service, now, out)
        for note in notes:
            out.write(f"  note: {note}\n")
        if options.out is not None:
            counts = _write_outputs(tally, services, service, options, options.out, notes)
            out.write(f"worklists for {len(counts)} rule(s) in {options.out / 'worklists'} (CSV and Parquet); "
                      f"equity view in {options.out / 'equity.csv'}; summary.json, skipped.csv\n")
        else:
            out.write("equity view (no --out: no worklists written)\n")
            print_equity(equity_rows(firings(tally, sorted(r.id for r in service.rules))), out)
        if options.lists:
            _lists(tally, services, service, settings, options, out)
        elapsed = time.perf_counter() - started
        rate = tally.patients / tally.seconds["screen"] if tally.seconds.get("screen") else 0.0
        err.write(f"screen: sharded in {tally.seconds['shard']:.1f} s, screened {tally.patients} patient(s) in "
                  f"{tally.seconds['screen']:.1f} s ({rate:.0f}/s on {runner.workers} worker(s)); "
                  f"{elapsed:.1f} s in all\n")
        return 0
    except (ExportError, ExportFailed, ListWriteError, ScreenError, NudgesError, OSError) as exc:
        message = exc.diagnostics if isinstance(exc, NudgesError) else str(exc)
        err.write(f"nudges screen: {message}\n")
        return 1
    except Terminated:
        err.write("nudges screen: stopped (SIGTERM); the work folder and its shards were removed; a server "
                  "export resumes where it stopped on the next run\n")
        return 143
    finally:
        if runner is not None:
            runner.close()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)  # the shards hold the whole export: never left behind
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM (a scheduler's or a container's stop) as an exception, so the shards are removed. Not an
    Exception, as KeyboardInterrupt is not: it is raised wherever the main thread happens to be, and an
    `except Exception` on the way (cluster.map's, around a task's result, which the main thread waits
    for while Dask fetches it) took the stop for that task's failure: exit 1, "a task failed", instead of 143."""


def _stop_on_sigterm() -> Any:
    """SIGTERM raises Terminated in the main thread (its default would end the process with the whole
    export left in the shards); the previous handler is given back after the run."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    return signal.signal(signal.SIGTERM, stop)
