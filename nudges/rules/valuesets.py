"""Value sets (named code lists) in the project's YAML or as FHIR R4 ValueSet JSON, a site's own codes
added to them, and the HL7 override-reason vocabulary cards offer."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .schema import Coding, SiteCodes, ValueSet

NON_ADHERENCE_SYSTEM = "http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes"
# HL7 CDS Hooks 3.0 non-adherence reason codes (CodeSystem non-adherence-reason-codes) with displays.
NON_ADHERENCE: dict[str, str] = {
    "patient-ineligible": "Patient does not meet eligibility for recommended action",
    "indication-order-exists": "Patient has indication/order for intended action",
    "action-completed": "Recommended action was already completed",
    "action-unsuccessful": "Recommended action was previously unsuccessful",
    "action-not-priority": "Recommended action is not relevant or a priority in current state of health",
    "limited-time": "Could not address recommended action due to limited time",
    "wrong-time-workflow": "PC CDS delivered at wrong time in workflow or patient lifecycle",
    "inappropriate-recipient": "PC CDS delivered to inappropriate recipient/role",
    "need-more-info": "Could not address recommended action due to need for more information/pending "
                      "results/pending consult",
    "does-not-align-latest-evidence": "Recommended action does not align with the latest evidence",
    "expert-contradicts": "Advice from expert contradicts the recommended action",
    "policy-contradicts": "Institutional policy/guideline contradicts the recommended action",
    "recipient-does-not-trust": "Recipient does not agree with or trust the recommended action",
    "risk-benefit-ratio": "Recipient assessment of risk/benefit ratio",
    "patient-contraindication": "Patient has contraindication to recommended action",
    "patient-fears-discomfort": "Patient fears discomfort from complying with recommended action",
    "cultural-religious-reason": "Patient has a cultural or religious reason for not following recommended "
                                 "action",
    "prefers-alternative": "Patient prefers an alternative approach or treatment",
    "patient-refuses": "Patient refuses/declines (no context given)",
    "inadequate-support": "Patient has inadequate caregiver/social support",
    "service-not-available": "Treatment or service is not practically available",
    "implementation-challenges": "Recommended action cannot be implemented due to technology/challenges",
    "too-costly-uncovered": "Recommended action is too costly or not covered by insurance",
    "recipient-does-not-understand": "Recipient does not understand the recommended action or know how to "
                                     "perform the recommended action",
    "comorbidity-disability": "Patient has co-morbidity or disability that hinders them from completing "
                              "recommended action",
}

# The service's own override reason, offered on every card that has override reasons: a snooze
# ("remind me later"), whose length is a service setting (suppression.snooze), not a rule's.
REASON_SYSTEM = "urn:nudges:override-reason"
REMIND_LATER_CODE = "remind-me-later"
REMIND_LATER: dict[str, str] = {"system": REASON_SYSTEM, "code": REMIND_LATER_CODE, "display": "Remind me later"}

RACE_SYSTEMS = frozenset({"urn:oid:2.16.840.1.113883.6.238"})


def override_coding(reason: str | Coding) -> dict[str, str]:
    if isinstance(reason, Coding):
        return {"system": reason.system, "code": reason.code, "display": reason.display}
    return {"system": NON_ADHERENCE_SYSTEM, "code": reason, "display": NON_ADHERENCE[reason]}


@dataclass(frozen=True)
class CompiledValueSet:
    name: str
    keys: frozenset[tuple[str, str]]
    displays: dict[tuple[str, str], str]
    title: str = ""
    source: str = ""
    version: str = ""
    date: str = ""
    url: str | None = None  # the canonical URL of an imported FHIR ValueSet
    site: tuple[str, ...] = ()  # sources of site codes added to the shipped list
    description: str = ""  # what the list is for, in its author's words

    @classmethod
    def of(cls, model: ValueSet) -> CompiledValueSet:
        displays = {(c.system, c.code): c.display for c in model.codes}
        return cls(model.name, frozenset(displays), displays, model.title, model.source or "", model.version or "",
                   model.date or "", description=(model.description or "").strip())

    def with_site(self, codes: SiteCodes) -> CompiledValueSet:
        displays = {**self.displays, **{(c.system, c.code): c.display for c in codes.codes}}
        return replace(self, keys=frozenset(displays), displays=displays, site=(*self.site, codes.source))

    def reads_race(self) -> bool:
        return any(system in RACE_SYSTEMS for system, _ in self.keys)


# -- FHIR R4 ValueSet ---------------------------------------------------------------------------------------
class FhirValueSetError(ValueError):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


def from_fhir(name: str, data: Any) -> CompiledValueSet:
    """A FHIR R4 ValueSet as the engine's code list: `expansion.contains` (nested too) when present, else
    `compose.include` concepts minus `compose.exclude` concepts. Intensional parts (filters, whole code
    systems, other value sets) cannot be expanded without a terminology server: refused, with the advice to
    export the expansion instead (VSAC and eCQM packages ship expansions)."""
    if not isinstance(data, dict) or data.get("resourceType") != "ValueSet":
        raise FhirValueSetError("", "not a FHIR ValueSet (resourceType must be \"ValueSet\")")
    displays: dict[tuple[str, str], str] = {}

    def coding(where: str, system: Any, item: Any) -> None:
        if not isinstance(item, dict) or not isinstance(item.get("code"), str) or not item["code"]:
            raise FhirValueSetError(where, "a concept needs a code")
        if not isinstance(system, str) or not system:
            raise FhirValueSetError(where, "a concept needs its code system (system)")
        display = item.get("display")
        displays[system, item["code"]] = display if isinstance(display, str) and display else item["code"]

    def contains(where: str, items: Any) -> None:
        for i, item in enumerate(items if isinstance(items, list) else []):
            at = f"{where}[{i}]"
            if isinstance(item, dict) and item.get("abstract") is not True and "code" in item:
                coding(at, item.get("system"), item)
            if isinstance(item, dict) and item.get("contains"):
                contains(f"{at}.contains", item["contains"])

    expansion = data.get("expansion")
    if isinstance(expansion, dict) and expansion.get("contains"):
        contains("expansion.contains", expansion["contains"])
    else:
        compose = data.get("compose")
        if not isinstance(compose, dict) or not compose.get("include"):
            raise FhirValueSetError("", "neither expansion.contains nor compose.include lists any code")
        for part in ("include", "exclude"):
            for i, include in enumerate(compose.get(part) or []):
                at = f"compose.{part}[{i}]"
                if not isinstance(include, dict):
                    raise FhirValueSetError(at, "must be an object")
                intensional = [k for k in ("filter", "valueSet") if include.get(k)]
                if intensional or not include.get("concept"):
                    why = f"uses {' and '.join(intensional)}" if intensional else "includes a whole code system"
                    raise FhirValueSetError(at, f"{why}, which needs a terminology server to expand: export the "
                                                "value set with its expansion (expansion.contains) and import that")
                if part == "include":
                    for j, concept in enumerate(include["concept"]):
                        coding(f"{at}.concept[{j}]", include.get("system"), concept)
                else:
                    for concept in include["concept"]:
                        if isinstance(concept, dict):
                            displays.pop((include.get("system"), concept.get("code")), None)  # type: ignore[arg-type]
    if not displays:
        raise FhirValueSetError("", "the value set holds no codes")
    text: dict[str, str] = {k: v if isinstance(v := data.get(k), str) else ""
                            for k in ("title", "name", "publisher", "version", "date", "url", "description")}
    source = " ".join(p for p in (text["publisher"], text["url"]) if p) or "imported FHIR ValueSet"
    if isinstance(expansion, dict) and isinstance(expansion.get("timestamp"), str):
        source += f" (expansion {expansion['timestamp']})"
    return CompiledValueSet(name, frozenset(displays), displays, text["title"] or text["name"] or name, source,
                            text["version"], text["date"][:10], text["url"] or None, description=text["description"])


def to_fhir(valueset: CompiledValueSet, base: str = "urn:nudges:valueset") -> dict[str, Any]:
    """A shipped value set as a FHIR R4 ValueSet (compose by code system, plus its expansion), so other
    tools (a terminology server, VSAC authoring, the console) can read the same list."""
    by_system: dict[str, list[dict[str, str]]] = {}
    for system, code in sorted(valueset.keys):
        by_system.setdefault(system, []).append({"code": code, "display": valueset.displays[system, code]})
    resource: dict[str, Any] = {
        "resourceType": "ValueSet", "id": valueset.name, "url": valueset.url or f"{base}/{valueset.name}",
        "name": valueset.name.replace("-", "_"), "title": valueset.title or valueset.name, "status": "active",
        "compose": {"include": [{"system": system, "concept": concepts} for system, concepts in by_system.items()]},
        "expansion": {"timestamp": f"{valueset.date}T00:00:00Z" if valueset.date else "1970-01-01T00:00:00Z",
                      "total": len(valueset.keys),
                      "contains": [{"system": s, "code": c["code"], "display": c["display"]}
                                   for s, concepts in by_system.items() for c in concepts]}}
    if valueset.version:
        resource["version"] = valueset.version
    if valueset.date:
        resource["date"] = valueset.date
    provenance = f"Source: {valueset.source}" + (f". Site codes: {'; '.join(valueset.site)}" if valueset.site else "")
    # the author's description first (it had been replaced by the provenance line), then where the codes came from
    resource["description"] = f"{valueset.description}\n\n{provenance}" if valueset.description else provenance
    return resource
