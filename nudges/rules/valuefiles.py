"""A rule set's value-set files (YAML, or FHIR R4 ValueSet JSON such as a VSAC expansion) read, checked and
compiled, with a site's own codes added to the shipped sets of the same name."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from . import cache, yamlfiles
from .folders import display as _show
from .folders import placeholders
from .resources import did_you_mean
from .schema import Coding, SiteCodes, ValueSet
from .valuesets import CompiledValueSet, FhirValueSetError, from_fhir
from .yamlfiles import Problem

Compiled = tuple[CompiledValueSet | None, list[Problem], list[Problem]]
_KNOWN: dict[tuple[str, bytes], Compiled] = {}
KNOWN_LIMIT = 2000


def _remembered(path: Path, display: str, compile_file: Any) -> Compiled:
    """One file compiled, with its problems and warnings, remembered in this process by the file's content:
    a large expansion (thousands of codes) costs tens of milliseconds to parse, validate and index, and a
    reloading service or a test suite loads the same files again and again."""
    try:
        digest = hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        digest = b""
    known = _KNOWN.get((display, digest))
    if known is not None:
        return known
    found: Compiled = compile_file(path, display)
    return cache.keep(_KNOWN, (display, digest), found, KNOWN_LIMIT) if digest else found


def _json_valueset(path: Path, display: str) -> Compiled:
    try:
        return from_fhir(path.stem, orjson.loads(path.read_bytes())), [], []
    except (OSError, orjson.JSONDecodeError, FhirValueSetError) as exc:
        return None, [Problem(display, 1, 1, f"FHIR ValueSet: {exc}")], []


def _yaml_valueset(path: Path, display: str) -> Compiled:
    problems: list[Problem] = []
    warnings: list[Problem] = []
    compiled = None
    document, found = yamlfiles.load(path, display)
    problems += found
    if document is not None:
        vs, found = yamlfiles.validate(ValueSet, document, display)
        problems += found
        if vs is not None:
            if vs.name != path.stem:
                problems.append(Problem(display, *yamlfiles.position(document, ("name",)),
                                        f"value set name '{vs.name}' must equal the file name"))
            compiled = CompiledValueSet.of(vs)
            left = placeholders(document.text)
            if left is not None:
                warnings.append(Problem(display, left[0], left[1], f"{left[2]} placeholder(s) from `nudges new "
                                        "rule` left to fill in (REPLACE, replace-me); this is the first"))
            missing = [k for k in ("source", "version", "date") if getattr(vs, k) is None]
            if missing:
                warnings.append(Problem(display, 1, 1, f"value set gives no {', '.join(missing)}: say where "
                                                       "its codes came from, so they can be checked again"))
    return compiled, problems, warnings


def load_valuesets(files: list[Path], site_files: list[Path],
                   show: Any = _show) -> tuple[dict[str, CompiledValueSet], list[Problem], list[Problem]]:
    """The rule set's value sets (YAML or FHIR ValueSet JSON, named by their file), then a site's codes
    added to the shipped sets of the same name; last, warnings for sets that do not say where their codes
    came from (source, version, date)."""
    problems: list[Problem] = []
    unsourced: list[Problem] = []
    valuesets: dict[str, CompiledValueSet] = {}
    for path in files:
        compiled, found, warned = _remembered(path, show(path),
                                              _json_valueset if path.suffix == ".json" else _yaml_valueset)
        problems += found
        unsourced += warned
        if compiled is not None:
            valuesets[path.stem if path.suffix == ".json" else compiled.name] = compiled
    for path in site_files:
        if path.stem not in valuesets:
            problems.append(Problem(show(path), 1, 1, f"site codes for '{path.stem}', which is not a value set of "
                                    f"the rule set{did_you_mean(path.stem, set(valuesets))}"))
            continue
        codes = _site_codes(path, show(path), problems)
        if codes is not None:
            valuesets[path.stem] = valuesets[path.stem].with_site(codes)
    return valuesets, problems, unsourced


def _site_codes(path: Path, display: str, problems: list[Problem]) -> SiteCodes | None:
    """A site's codes for one shipped set: FHIR ValueSet JSON, or the project's YAML list."""
    if path.suffix == ".json":
        extra, found, _ = _json_valueset(path, display)
        problems += found
        if extra is None:
            return None
        return SiteCodes(name=path.stem, source=extra.source, codes=[
            Coding(system=s, code=c, display=extra.displays[s, c]) for s, c in sorted(extra.keys)])
    document, found = yamlfiles.load(path, display)
    problems += found
    if document is None:
        return None
    codes, found = yamlfiles.validate(SiteCodes, document, display)
    problems += found
    if codes is None:
        return None
    if codes.name != path.stem:
        problems.append(Problem(display, *yamlfiles.position(document, ("name",)),
                                f"name '{codes.name}' must equal the file name"))
        return None
    return codes
