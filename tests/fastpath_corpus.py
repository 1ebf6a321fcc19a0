"""What the compiled-FHIRPath tests compare on: the shipped expressions, the fixture resources, the
reference (fhirpathpy as nudges configures it) and a type-exact picture of an outcome.

Why a module of its own: tests/test_fastpath.py and tests/fhirpath_official.py must look at exactly the
same expressions, data and comparison. The expressions are read from the rule files themselves (every
`where:`, `date:` and `when.patient:`), so a rule added to the catalog is checked without a test edit."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from fhirpathpy.engine.nodes import FP_Quantity, FP_TimeBase, ResourceNode
from fhirpathpy.models import models
from fhirpathpy.parser import parse

from nudges.rules import yamlfiles
from nudges.rules.fastpath import compile_fast
from nudges.rules.fhirpath import interpreted, member_of
from nudges.rules.valuefiles import load_valuesets

ROOT = Path(__file__).resolve().parent.parent
R4 = models["r4"]
ENV: dict[str, Any] = {"now": "2026-03-02T12:00:00Z", "today": "2026-03-02", "hook": "patient-view",
                       "patientId": "example", "encounterId": "example", "userId": "Practitioner/example"}
ValueSets = Mapping[str, frozenset[tuple[str, str]]]
Fn = Callable[..., list[Any]]


@dataclass(frozen=True)
class Shipped:
    expression: str
    resource_type: str  # what the clause's `resource:` says (Patient for when.patient)
    field: str  # where, date or patient
    source: str  # rule file, relative to the checkout
    bindings: tuple[tuple[str, str], ...] = ()  # the rule's `as:` names and their resource types


def _yaml(path: Path) -> Any:
    """A rule or cases file's plain values, read as the service reads it (and cached as it caches them)."""
    document, problems = yamlfiles.load(path, str(path))
    assert document is not None, problems
    return document.plain


def _names(node: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(node, dict):
        if isinstance(node.get("as"), str) and isinstance(node.get("resource"), str):
            out[node["as"]] = node["resource"]
        for value in node.values():
            _names(value, out)
    elif isinstance(node, list):
        for value in node:
            _names(value, out)
    return out


@functools.cache
def shipped(rules: Path = ROOT / "rules") -> tuple[Shipped, ...]:
    """Every `where:`, `date:` and `when.patient:` in the rule files (not the cases)."""
    found: dict[tuple[str, str, str], Shipped] = {}

    def walk(node: Any, resource: str | None, source: str, top: bool, bound: tuple[tuple[str, str], ...]) -> None:
        if isinstance(node, dict):
            here = node.get("resource") if isinstance(node.get("resource"), str) else resource
            for key, value in node.items():
                if key in ("where", "date") and isinstance(value, str):
                    found.setdefault((value, here or "", key), Shipped(value, here or "", key, source, bound))
                if key == "patient" and isinstance(value, str) and top:
                    found.setdefault((value, "Patient", key), Shipped(value, "Patient", key, source, bound))
                walk(value, here, source, key == "when", bound)
        elif isinstance(node, list):
            for value in node:
                walk(value, resource, source, False, bound)

    for path in sorted(rules.rglob("*.yaml")):
        if path.name.endswith(".cases.yaml") or path.parent.name == "valuesets" or path.name == "ruleset.yaml":
            continue
        data = _yaml(path)
        walk(data, None, str(path.relative_to(ROOT)), False, tuple(sorted(_names(data, {}).items())))
    return tuple(found.values())


@functools.cache
def value_sets(rules: Path = ROOT / "rules") -> dict[str, frozenset[tuple[str, str]]]:
    """The rule set's value sets (YAML and FHIR ValueSet JSON) as memberOf sees them: name -> keys."""
    files = sorted(p for p in rules.rglob("*") if p.parent.name == "valuesets" and p.suffix in (".yaml", ".json"))
    found, problems, _ = load_valuesets(files, [])
    assert not problems, problems
    return {name: vs.keys for name, vs in found.items()}


@functools.cache
def records() -> tuple[tuple[str, tuple[dict[str, Any], ...]], ...]:
    """(where from, resources) for every fixture bundle and every case's inline `resources:`,
    `draft_orders:` and `appointments:`, round-tripped through JSON as a hook request would be."""
    found = []
    for path in sorted((ROOT / "fhir_fixtures").rglob("*.json")):
        data = orjson.loads(path.read_bytes())
        if not isinstance(data, dict):
            continue
        entries = data.get("entry", []) if data.get("resourceType") == "Bundle" else [{"resource": data}]
        resources = [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
        found.append((str(path.relative_to(ROOT)), tuple(r for r in resources if "resourceType" in r)))
    for path in sorted((ROOT / "rules").rglob("*.cases.yaml")):
        for i, case in enumerate(_yaml(path).get("cases") or []):
            inline = [r for key in ("resources", "draft_orders", "appointments") for r in case.get(key) or []
                      if isinstance(r, dict)]
            if inline:
                found.append((f"{path.relative_to(ROOT)}#{i}", tuple(orjson.loads(orjson.dumps(inline)))))
    return tuple(found)


def environment(expression: Shipped, record: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """ENV plus the rule's bound names, each bound to the record's first resource of its type (as the
    engine binds a clause's match); a name the record cannot bind is left out (fhirpathpy then raises)."""
    env = dict(ENV)
    for name, resource_type in expression.bindings:
        match = next((r for r in record if r.get("resourceType") == resource_type), None)
        if match is not None:
            env[name] = match
    return env


@functools.cache
def tree(expression: str) -> Any:
    """fhirpathpy's own parse (with its silent recovery from some lexer errors), as both forms see it."""
    return parse(expression)


def _frozen(valuesets: ValueSets) -> frozenset[tuple[str, frozenset[tuple[str, str]]]]:
    return frozenset(valuesets.items())


@functools.lru_cache(maxsize=2048)
def _pair(expression: str, valuesets: frozenset[tuple[str, frozenset[tuple[str, str]]]]) -> tuple[Fn | None, Fn]:
    sets = dict(valuesets)
    member = member_of(sets)
    return compile_fast(tree(expression), sets, member), interpreted(tree(expression), member)


def compiled(expression: str, valuesets: ValueSets) -> Fn | None:
    """The compiled form, or None outside the subset."""
    return _pair(expression, _frozen(valuesets))[0]


def reference(expression: str, valuesets: ValueSets) -> Fn:
    """fhirpathpy exactly as nudges runs it: the same tree, the R4 model, the same memberOf."""
    return _pair(expression, _frozen(valuesets))[1]


def canon(value: Any) -> Any:
    """A comparable, type-exact picture of a result: 1, 1.0 and True differ; FHIRPath dates and
    quantities compare by their text and unit (their own __eq__ is not an identity)."""
    if isinstance(value, list):
        return ["list", *[canon(v) for v in value]]
    if isinstance(value, dict):
        return ["dict", *sorted((str(k), canon(v)) for k, v in value.items())]
    if isinstance(value, FP_TimeBase):
        return [type(value).__name__, getattr(value, "asStr", None)]
    if isinstance(value, FP_Quantity):
        return ["Quantity", canon(value.value), value.unit]
    if isinstance(value, ResourceNode):
        return ["node", value.path, canon(value.data)]
    if isinstance(value, Decimal | float):
        return [type(value).__name__, str(value)]
    if value is None or isinstance(value, bool | int | str):
        return [type(value).__name__, value]
    return [type(value).__name__, repr(value)]


def outcome(fn: Fn, resource: Any, env: Mapping[str, Any]) -> tuple[str, Any]:
    """('ok', canonical result) or ('raises', exception type name)."""
    try:
        return "ok", canon(fn(resource, env))
    except Exception as exc:  # the type is the outcome: both forms must raise alike
        return "raises", type(exc).__name__


def by_type() -> dict[str, list[tuple[dict[str, Any], tuple[dict[str, Any], ...]]]]:
    found: dict[str, list[tuple[dict[str, Any], tuple[dict[str, Any], ...]]]] = {}
    for _source, record in records():
        for resource in record:
            found.setdefault(str(resource.get("resourceType")), []).append((resource, record))
    return found


def resources() -> Iterator[tuple[str, dict[str, Any]]]:
    for source, found in records():
        for resource in found:
            yield source, resource
