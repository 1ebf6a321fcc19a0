"""A Bulk Data export (NDJSON files, one resource per line, any types) regrouped by patient, on disk.

Exports come one file per resource type, so one patient's data is spread over every file. An all-to-all
shuffle through the cluster's memory (Dask's groupby) is what its documentation warns against; instead
each input chunk (a byte range of one file, split at line ends) is read once by one task, which appends
every line to the shard of its patient, chosen by a stable hash of the patient id. A shard is then a
folder of small part files (one per chunk that had lines for it) that one task reads whole: every
patient's resources are in exactly one shard. Shard files hold `patient id TAB raw line`, so a line is
parsed again only where it is evaluated.

Nothing here depends on how many workers run: the chunks and shards follow the input's size, and the
order of lines within a shard (parts in chunk order, lines in file order) is fixed.
"""

from __future__ import annotations

import gzip
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec
import orjson

from ..fhir import FHIR_ID, parse_reference, patient_in
from ..planned import is_utf8

CHUNK_BYTES = 64 * 1024 * 1024  # one task's share of an input file
SHARD_BYTES = 24 * 1024 * 1024  # aimed-for input bytes per shard: a shard's patients fit in a worker's memory
MAX_SHARDS = 4096
SUFFIXES = (".ndjson", ".ndjson.gz")


class ExportError(Exception):
    """An export that cannot be read at all (no such folder, no NDJSON in it)."""


@dataclass(frozen=True)
class Chunk:
    """Lines of one file that start in [start, end): every line belongs to exactly one chunk."""

    path: str
    start: int
    end: int
    file: int  # the file's position in the sorted input
    part: int  # the chunk's position within its file

    @property
    def name(self) -> str:
        return f"{self.file:05d}-{self.part:05d}"


@dataclass
class ChunkTally:
    """What one chunk held. Line numbers are within the chunk; the driver makes them file line numbers."""

    chunk: Chunk
    lines: int = 0
    resources: int = 0
    unlinked: int = 0  # resources that name no patient (Practitioner, Organization ...)
    unread: int = 0  # a patient's resources no rule of the hook can read (IndexPlan.reads)
    medications: int = 0  # Medication resources, joined to the orders that name them (see join_medications)
    invalid: list[tuple[int, str]] = field(default_factory=list)
    shard_bytes: dict[int, int] = field(default_factory=dict)  # what it wrote to each shard
    buckets: set[int] = field(default_factory=set)  # medication buckets it wrote to
    cpu_seconds: float = 0.0


@dataclass
class JoinTally:
    """One medication bucket's join: references resolved, and those the export has no Medication for."""

    bucket: int
    joined: int = 0
    unresolved: int = 0
    shard_bytes: dict[int, int] = field(default_factory=dict)


def export_files(source: Path) -> list[Path]:
    """The NDJSON files of an export folder (or the one file given), in a fixed order."""
    if not source.exists():
        raise ExportError(f"{source}: no such file or folder")
    if source.is_file():
        return [source]
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    if not files:
        raise ExportError(f"{source}: no *.ndjson files (a FHIR Bulk Data export has one or more per type)")
    return files


def plan_chunks(files: list[Path], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Byte ranges of at most `chunk_bytes`; a compressed file is one chunk (it cannot be entered midway)."""
    chunks: list[Chunk] = []
    for number, path in enumerate(files):
        size = path.stat().st_size
        if path.name.endswith(".gz") or size <= chunk_bytes:
            chunks.append(Chunk(str(path), 0, size, number, 0))
            continue
        for part, start in enumerate(range(0, size, chunk_bytes)):
            chunks.append(Chunk(str(path), start, min(start + chunk_bytes, size), number, part))
    return chunks


def shard_count(files: list[Path], least: int = 1, shard_bytes: int = SHARD_BYTES) -> int:
    """From the input's size (and at least `least`, enough tasks to keep every worker busy). The output
    does not depend on it: worklists are merged and sorted by patient whatever the sharding."""
    total = sum(p.stat().st_size for p in files)
    return max(least, min(MAX_SHARDS, -(-total // shard_bytes)))


def shard_of(patient: str, shards: int) -> int:
    """A hash that is the same in every process and on every machine (Python's own hash() is not)."""
    return zlib.crc32(patient.encode()) % shards


def shard_folder(work: Path, shard: int) -> Path:
    return work / "shards" / f"{shard:05d}"


def medication_folder(work: Path, bucket: int) -> Path:
    return work / "medications" / f"{bucket:05d}"


def medication_reference(value: object) -> str | None:
    """The id of a Medication that a `medicationReference` value names outside the resource
    (`Medication/x`, also absolute), which only the export's own Medication resources can resolve."""
    parsed = parse_reference(value.get("reference")) if isinstance(value, dict) else None
    return parsed.id if parsed is not None and parsed.type == "Medication" else None


def _lines(chunk: Chunk) -> tuple[list[bytes], bool]:
    """The lines that start inside the chunk (the last one may run past its end), read in one go, and
    whether they are all UTF-8 (checked once for the chunk instead of once per line)."""
    tail = b""
    if chunk.path.endswith(".gz"):
        with gzip.open(chunk.path, "rb") as stream:
            data = stream.read()
    else:
        with open(chunk.path, "rb") as stream:
            start = chunk.start
            if start:
                stream.seek(start - 1)
                if stream.read(1) != b"\n":
                    start += len(stream.readline())  # the line under way belongs to the chunk before
            if start >= chunk.end:
                return [], True
            data = stream.read(chunk.end - start)
            if not data.endswith(b"\n"):
                tail = stream.readline()  # the last line runs on past the end (joined below, not to the chunk)
    checked = is_utf8(data, tail)
    lines = data.split(b"\n")
    if tail:
        lines[-1] += tail[:-1] if tail.endswith(b"\n") else tail
    if lines and not lines[-1]:
        lines.pop()  # after the final newline
    return lines, checked


BOM = b"\xef\xbb\xbf"


class _Head(msgspec.Struct):
    """What the split needs of a line: its type, its patient (fhir.patient_in), a Medication's id and an
    order's medicationReference. msgspec skips the rest of the line without building it."""

    resourceType: Any = None
    id: Any = None
    subject: Any = None
    patient: Any = None
    beneficiary: Any = None
    medicationReference: Any = None


_HEAD = msgspec.json.Decoder(_Head)
_NAMES = tuple(_Head.__struct_fields__)


class Sieve(Protocol):
    """What no rule of the hook can read, judged on a line's head (planned.Heads is one)."""

    def decode_line(self, data: bytes) -> tuple[str, Any, bool] | None:
        """The line's type, its head (with the elements _Head has) and whether a rule can read it; None
        to have the line read the slow way (_head, then reads_json)."""

    def reads_json(self, data: bytes, kind: str) -> bool: ...


def _parse(line: bytes) -> dict[str, Any] | str:
    """A line parsed in full, or why it is not a FHIR resource in orjson's words (the parser that reads it
    when it is screened)."""
    try:
        resource = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"not JSON ({exc})"
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return "not a FHIR resource (no resourceType)"
    return resource


def _head(line: bytes) -> _Head | str:
    """A line's head, or why it is not a FHIR resource. msgspec decodes only the head; a line it refuses
    is judged by orjson."""
    try:
        head = _HEAD.decode(line)
    except (msgspec.DecodeError, RecursionError):  # msgspec's depth limit is a RecursionError (orjson: 1024)
        head = None
    if head is not None and isinstance(head.resourceType, str):
        return head
    found = _parse(line)
    return found if isinstance(found, str) else _Head(**{name: found.get(name) for name in _NAMES})


def _fault(line: bytes, parsed: bool, checked: bool) -> str | None:
    """What is wrong with a line whose head was read: a line that is kept is parsed in full (screening it
    must not fail, and bad JSON is reported by its line number); one that is left out is checked as UTF-8
    (the one fault a parser that skips what it does not need can miss), unless its whole chunk was."""
    if not parsed and (checked or is_utf8(line)):
        return None
    found = _parse(line)
    return found if isinstance(found, str) else None


def split_chunk(chunk: Chunk, shards: int, work: Path, sieve: Sieve | None = None) -> ChunkTally:
    """Read one chunk and append each resource's line to its patient's shard (one part file per shard,
    named after the chunk, written whole so a retried task replaces rather than duplicates). A resource
    the sieve says no rule can read is counted and left out, unparsed: a line is judged by its head, and
    only a line that is kept is parsed in full here (_fault)."""
    tally = ChunkTally(chunk)
    cpu = time.process_time()
    buffers: dict[int, list[bytes]] = {}
    medications: dict[int, list[bytes]] = {}  # bucket -> "id TAB line" of Medication resources
    wanted: dict[int, list[bytes]] = {}  # bucket -> "medication id TAB patient id TAB shard" of references
    lines, checked = _lines(chunk)
    decode = sieve.decode_line if sieve is not None else None
    for number, raw in enumerate(lines, 1):
        tally.lines = number
        line = raw.strip()
        if line.startswith(BOM):  # a byte-order mark, as some Windows tools write: not part of the JSON
            line = line[len(BOM):].strip()
        if not line:
            continue
        decoded = decode(line) if decode is not None else None
        kept: bool | None
        if decoded is not None:
            kind, head, kept = decoded
        else:
            head = _head(line)
            if isinstance(head, str):
                tally.invalid.append((number, head))
                continue
            kind, kept = head.resourceType, None
        pid = patient_in(kind, head.id, head.subject, head.patient, head.beneficiary)
        if pid is None:
            mid = head.id
            medication = kind == "Medication" and isinstance(mid, str) and FHIR_ID.match(mid) is not None
            if (why := _fault(line, medication, checked)) is not None:
                tally.invalid.append((number, why))
            elif medication:
                tally.medications += 1
                medications.setdefault(shard_of(mid, shards), []).append(mid.encode() + b"\t" + line + b"\n")
            else:
                tally.unlinked += 1
            continue
        if kept is None:
            kept = sieve is None or sieve.reads_json(line, kind)
        if (why := _fault(line, kept, checked)) is not None:
            tally.invalid.append((number, why))
            continue
        tally.resources += 1
        if not kept:
            tally.unread += 1
            continue
        shard = shard_of(pid, shards)
        buffers.setdefault(shard, []).append(pid.encode() + b"\t" + line + b"\n")
        named = medication_reference(head.medicationReference)
        if named is not None:
            wanted.setdefault(shard_of(named, shards), []).append(f"{named}\t{pid}\t{shard}\n".encode())
    for shard, lines in buffers.items():
        tally.shard_bytes[shard] = _write_part(shard_folder(work, shard), f"{chunk.name}.part", lines)
    for bucket, lines in medications.items():
        _write_part(medication_folder(work, bucket), f"{chunk.name}.medications", lines)
    for bucket, lines in wanted.items():
        _write_part(medication_folder(work, bucket), f"{chunk.name}.wanted", lines)
    tally.buckets = set(wanted)  # a bucket nobody references needs no join
    tally.cpu_seconds = time.process_time() - cpu
    return tally


def join_medications(bucket: int, work: Path) -> JoinTally:
    """Give each patient a copy of every Medication their orders name by reference: a disk join keyed by
    the medication id's hash, so no task needs every Medication of the export. The copies go into the
    patients' shards as a part named after the bucket (after the chunks' parts, in a fixed order)."""
    tally = JoinTally(bucket)
    folder = medication_folder(work, bucket)
    known: dict[str, bytes] = {}
    for part in sorted(folder.glob("*.medications")):
        with open(part, "rb") as stream:
            for line in stream:
                raw_id, _, body = line.partition(b"\t")
                known.setdefault(raw_id.decode(), body)  # the first of duplicate ids wins, as in a record
    out: dict[int, list[bytes]] = {}
    seen: set[tuple[str, str]] = set()
    for part in sorted(folder.glob("*.wanted")):
        with open(part, "rb") as stream:
            for line in stream:
                wanted_id, pid, target = line.rstrip(b"\n").decode().split("\t")
                if (wanted_id, pid) in seen:
                    continue
                seen.add((wanted_id, pid))
                found = known.get(wanted_id)
                if found is None:
                    tally.unresolved += 1
                    continue
                tally.joined += 1
                out.setdefault(int(target), []).append(pid.encode() + b"\t" + found)
    for shard, lines in out.items():
        tally.shard_bytes[shard] = _write_part(shard_folder(work, shard), f"medications-{bucket:05d}.part", lines)
    return tally


def _write_part(folder: Path, name: str, lines: list[bytes]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    data = b"".join(lines)
    _write_whole(folder / name, data)
    return len(data)


def _write_whole(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(temporary, "wb") as stream:
        stream.write(data)
    os.replace(temporary, path)


def read_shard(folder: Path) -> list[tuple[str, list[bytes]]]:
    """Every patient of a shard with their raw resource lines, patients in id order, each patient's lines
    in input order (parts are named by chunk, so sorting them restores it)."""
    patients: dict[str, list[bytes]] = {}
    for part in sorted(folder.glob("*.part")):
        with open(part, "rb") as stream:
            for line in stream:
                pid, _, body = line.partition(b"\t")
                key = pid.decode()
                found = patients.get(key)
                if found is None:
                    patients[key] = [body]
                else:
                    found.append(body)
    return sorted(patients.items())

