"""Prefetch templates derived from the rules' data requirements, and how a call's data is completed:
prefetch first, the FHIR server for what is missing, 412 when neither has it."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import PreconditionFailed
from .fhir import CODE_SEARCH_PARAM, MEDICATION_TYPES, bundle
from .rules.compiled import CompiledRule

MAX_CODES_IN_URL = 60
TOKEN = re.compile(r"\{\{\s*(context\.(patientId|encounterId|userId))\s*\}\}")


@dataclass(frozen=True)
class PrefetchPlan:
    """Templates for one service; `required` keys must be obtained or the call gets 412."""

    templates: dict[str, str]
    required: frozenset[str] = field(default_factory=frozenset)


def plan_for(rules: tuple[CompiledRule, ...]) -> PrefetchPlan:
    """One template per resource type the rules read from the record (codes merged per type), required
    unless every clause that reads the type says `required: false`.

    A code filter is added only where it cannot drop what a rule matches: never with a `text:` clause
    (local wording has no code), never for medication types (a server's `code` search misses orders coded
    by `medicationReference`, which come with their Medication through `_include`)."""
    codes: dict[str, set[tuple[str, str]] | None] = {}
    needed: set[str] = set()  # types some clause cannot do without (`required: false` reads when sent)
    needs_patient = False
    for rule in rules:
        if rule.age_min is not None or rule.age_max is not None or rule.patient is not None:
            needs_patient = True
        for clause in rule.clauses():
            if "record" not in clause.sources:
                continue
            if clause.resource == "Patient":
                needs_patient = True
                continue
            if clause.required:
                needed.add(clause.resource)
            if clause.codes is None or clause.text is not None or clause.resource not in CODE_SEARCH_PARAM:
                codes[clause.resource] = None
            elif clause.resource not in codes or codes[clause.resource] is not None:
                merged = codes.get(clause.resource) or set()
                codes[clause.resource] = merged | set(clause.codes)
    templates = {"patient": "Patient/{{context.patientId}}"}
    required = {"patient"} if needs_patient else set()
    for kind in sorted(codes):
        query = f"{kind}?patient={{{{context.patientId}}}}"
        wanted = codes[kind]
        if wanted and len(wanted) <= MAX_CODES_IN_URL:
            query += f"&{CODE_SEARCH_PARAM[kind]}=" + ",".join(f"{s}|{c}" for s, c in sorted(wanted))
        if kind in MEDICATION_TYPES:
            query += f"&_include={kind}:medication"
        key = kind[0].lower() + kind[1:]
        templates[key] = query
        if kind in needed:
            required.add(key)
    templates.setdefault("coverage", "Coverage?patient={{context.patientId}}")
    return PrefetchPlan(templates, frozenset(required))


@functools.cache
def _keys(templates: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str, bool, bool], ...]:
    """Per prefetch key: the resource type its template asks for, whether it is a read (Type/id), and
    whether the search `_include`s the medication its results name (worked out once per plan)."""
    found = []
    for key, template in templates:
        kind = re.split(r"[/?]", template, maxsplit=1)[0]
        found.append((key, kind, template.startswith(f"{kind}/"), f"_include={kind}:medication" in template))
    return tuple(found)


def fill(plan: PrefetchPlan, resources: list[dict[str, Any]]) -> dict[str, Any]:
    """The prefetch an EHR would send for these resources, one key per template: a read (`Patient/{{...}}`)
    gets the first resource of its type or null, a search a searchset Bundle of every resource of its type
    (code filters left to the index, which applies them exactly), with the Medications among the
    resources where the search `_include`s the orders' medication."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for resource in resources:
        by_type.setdefault(str(resource.get("resourceType")), []).append(resource)
    prefetch: dict[str, Any] = {}
    for key, kind, read, included in _keys(tuple(plan.templates.items())):
        if read:
            prefetch[key] = next(iter(by_type.get(kind, ())), None)
        elif included and "Medication" in by_type:
            prefetch[key] = bundle(by_type.get(kind, []) + by_type["Medication"], "searchset")
        else:
            prefetch[key] = bundle(by_type.get(kind, []), "searchset")
    return prefetch


def render(template: str, context: dict[str, Any]) -> str:
    return TOKEN.sub(lambda m: str(context.get(m.group(2), "")), template)


def usable(value: Any) -> bool:
    """A prefetch value the service can use: null (no data) or a resource that is not an
    OperationOutcome (the client's way of saying that key failed)."""
    return value is None or (isinstance(value, dict) and value.get("resourceType") not in
                             (None, "OperationOutcome"))


def missing_keys(plan: PrefetchPlan, prefetch: dict[str, Any]) -> list[str]:
    return [key for key in plan.templates if key not in prefetch or not usable(prefetch[key])]


def paged(value: Any) -> bool:
    """A Bundle with a `next` link: the first page of the search, not all of it. CDS clients send such
    pages (the HL7 sandbox sends each search's first page of 20); taken as the whole answer, what is on a
    later page looks absent, and a rule that fires on an absence (no screening test in ten years) fires
    wrongly."""
    return isinstance(value, dict) and value.get("resourceType") == "Bundle" and any(
        isinstance(link, dict) and link.get("relation") == "next" for link in value.get("link") or ())


def paged_keys(plan: PrefetchPlan, prefetch: dict[str, Any]) -> list[str]:
    return [key for key in plan.templates if paged(prefetch.get(key))]


def unobtainable(keys: list[str], plan: PrefetchPlan, why: str) -> PreconditionFailed | None:
    """The 412 for keys that could not be had, when any of them is required (the one place this is decided)."""
    required = [k for k in keys if k in plan.required]
    if not required:
        return None
    return PreconditionFailed(f"required data unavailable ({', '.join(required)}): {why}")
