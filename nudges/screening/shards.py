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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ..fhir import patient_of

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
    unlinked: int = 0  # resources that name no patient (Practitioner, Organization, Medication ...)
    invalid: list[tuple[int, str]] = field(default_factory=list)
    shard_bytes: dict[int, int] = field(default_factory=dict)  # what it wrote to each shard


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


def _lines(chunk: Chunk) -> Iterator[bytes]:
    """The lines that start inside the chunk (the last one may run past its end)."""
    if chunk.path.endswith(".gz"):
        with gzip.open(chunk.path, "rb") as stream:
            yield from stream
        return
    with open(chunk.path, "rb") as stream:
        if chunk.start:
            stream.seek(chunk.start - 1)
            if stream.read(1) != b"\n":
                stream.readline()  # the line under way belongs to the chunk before
        position = stream.tell()
        while position < chunk.end:
            line = stream.readline()
            if not line:
                return
            position += len(line)
            yield line


def split_chunk(chunk: Chunk, shards: int, work: Path) -> ChunkTally:
    """Read one chunk and append each resource's line to its patient's shard (one part file per shard,
    named after the chunk, written whole so a retried task replaces rather than duplicates)."""
    tally = ChunkTally(chunk)
    buffers: dict[int, list[bytes]] = {}
    for number, raw in enumerate(_lines(chunk), 1):
        tally.lines = number
        line = raw.strip()
        if not line:
            continue
        try:
            resource = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            tally.invalid.append((number, f"not JSON ({exc})"))
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            tally.invalid.append((number, "not a FHIR resource (no resourceType)"))
            continue
        pid = patient_of(resource)
        if pid is None:
            tally.unlinked += 1
            continue
        tally.resources += 1
        buffers.setdefault(shard_of(pid, shards), []).append(pid.encode() + b"\t" + line + b"\n")
    for shard, lines in buffers.items():
        folder = shard_folder(work, shard)
        folder.mkdir(parents=True, exist_ok=True)
        data = b"".join(lines)
        _write_whole(folder / f"{chunk.name}.part", data)
        tally.shard_bytes[shard] = len(data)
    return tally


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

