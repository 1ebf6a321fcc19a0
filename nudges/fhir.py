"""FHIR R4 helpers over plain JSON dicts: ids, references, dates, codings, bundles, whose patient.

The one home for what the service knows about FHIR data itself. Resources stay the dicts orjson made;
no model is built here, because every function runs on the hot path of a hook call.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

Resource = dict[str, Any]

# FHIR `id` datatype; a relative reference Type/id; an absolute or relative reference, optionally versioned.
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR_ID, unanchored: for fullmatch from a position
RELATIVE_REFERENCE = re.compile(r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}$")
_REFERENCE = re.compile(r"^(?:(?P<base>[^\s?#]+?)/)?(?P<type>[A-Z][A-Za-z]{1,63})/"
                        r"(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")

# Elements whose codings say what a resource *is*: the code index, `text:` clauses and prefetch filters.
CODE_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Observation": ("code",),
    "Condition": ("code",),
    "Procedure": ("code",),
    "ServiceRequest": ("code",),
    "DiagnosticReport": ("code",),
    "MedicationRequest": ("medicationCodeableConcept",),
    "MedicationStatement": ("medicationCodeableConcept",),
    "MedicationAdministration": ("medicationCodeableConcept",),
    "MedicationDispense": ("medicationCodeableConcept",),
    "Medication": ("code",),
    "Immunization": ("vaccineCode",),
    "AllergyIntolerance": ("code",),
    "Encounter": ("type", "hospitalization.dischargeDisposition", "reasonCode"),
    "Appointment": ("serviceType", "appointmentType", "reasonCode"),
    "Coverage": ("type",),
    "Flag": ("code",),
    "Task": ("code",),
    "DocumentReference": ("type",),
    "CarePlan": ("category",),
    "DeviceRequest": ("codeCodeableConcept",),
    "Communication": ("reasonCode",),
    "CommunicationRequest": ("reasonCode",),
    "ClinicalImpression": ("code",),
    "RiskAssessment": ("code",),
    "EpisodeOfCare": ("type",),
    "Consent": ("category",),
    "QuestionnaireResponse": (),
}

# Resource types that name their medication by code or by reference to a Medication (medication[x]).
MEDICATION_TYPES = frozenset({"MedicationRequest", "MedicationStatement", "MedicationAdministration",
                              "MedicationDispense"})

# Where each type keeps its clinically relevant date, first present wins.
DATE_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Observation": ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"),
    "Condition": ("onsetDateTime", "onsetPeriod.start", "recordedDate"),
    "Procedure": ("performedDateTime", "performedPeriod.start"),
    "ServiceRequest": ("authoredOn", "occurrenceDateTime", "occurrencePeriod.start"),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "MedicationRequest": ("authoredOn",),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod.start", "dateAsserted"),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod.start"),
    "MedicationDispense": ("whenHandedOver", "whenPrepared"),
    "Immunization": ("occurrenceDateTime", "recorded"),
    "AllergyIntolerance": ("recordedDate", "onsetDateTime"),
    "Encounter": ("period.start",),
    "Appointment": ("start", "created"),
    "Coverage": ("period.start",),
    "Flag": ("period.start",),
    "Task": ("authoredOn", "executionPeriod.start"),
    "DocumentReference": ("date",),
    "CarePlan": ("period.start", "created"),
    "DeviceRequest": ("authoredOn", "occurrenceDateTime"),
    "Communication": ("sent", "received"),
    "CommunicationRequest": ("authoredOn",),
    "QuestionnaireResponse": ("authored",),
    "ClinicalImpression": ("effectiveDateTime", "date"),
    "RiskAssessment": ("occurrenceDateTime",),
    "EpisodeOfCare": ("period.start",),
    "Consent": ("dateTime",),
    "NutritionOrder": ("dateTime",),
}
_DATE_PATHS = {kind: tuple(tuple(p.split(".")) for p in paths) for kind, paths in DATE_ELEMENTS.items()}

# The search parameter that matches each type's code element (token search), for prefetch filters.
CODE_SEARCH_PARAM = {"Observation": "code", "Condition": "code", "Procedure": "code", "ServiceRequest": "code",
                     "DiagnosticReport": "code", "AllergyIntolerance": "code", "Immunization": "vaccine-code"}


# -- references -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    base: str | None  # the server part of an absolute reference
    type: str
    id: str

    @property
    def relative(self) -> str:
        return f"{self.type}/{self.id}"


def parse_reference(text: Any) -> Reference | None:
    """A literal reference (relative, absolute, or versioned with /_history/), else None."""
    match = _REFERENCE.match(text) if isinstance(text, str) else None
    return Reference(match["base"], match["type"], match["id"]) if match else None


def reference_of(resource: Resource) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def patient_of(resource: Resource) -> str | None:
    """The FHIR id of the patient a resource is about: a Patient's own id, else the first of subject,
    patient or beneficiary that references a Patient. Ids that are not FHIR ids are refused, because the
    answer ends up in queries and database rows."""
    get = resource.get  # the elements that can name the patient, in the order they are tried
    return patient_in(get("resourceType"), get("id"), get("subject"), get("patient"), get("beneficiary"))


def patient_in(kind: Any, rid: Any, *references: Any) -> str | None:
    """patient_of from a resource's type, id and the values of those elements, in that order: what
    population screening's split decodes of a line, without the rest of it."""
    if kind == "Patient":
        return rid if isinstance(rid, str) and FHIR_ID.match(rid) else None
    for value in references:
        if not isinstance(value, dict):
            continue
        text = value.get("reference")
        if isinstance(text, str) and text.startswith("Patient/") and _ID.fullmatch(text, 8):
            return text[8:]  # the common "Patient/id", without the general pattern's cost
        ref = parse_reference(text)
        if ref is not None and ref.type == "Patient":
            return ref.id
    return None


# -- code systems -----------------------------------------------------------------------------------------
# The same code systems under their other names: HL7 v3 OIDs (which many EHR interfaces still send as
# `urn:oid:...`) and the URIs VSAC uses where FHIR's differ. Codings are compared under FHIR's canonical
# URI, so a rule's value set matches a code whichever name its sender used.
SYSTEM_ALIASES: dict[str, str] = {
    "urn:oid:2.16.840.1.113883.6.1": "http://loinc.org",
    "urn:oid:2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "urn:oid:2.16.840.1.113883.6.88": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "urn:oid:2.16.840.1.113883.6.90": "http://hl7.org/fhir/sid/icd-10-cm",
    "urn:oid:2.16.840.1.113883.6.3": "http://hl7.org/fhir/sid/icd-10",
    "urn:oid:2.16.840.1.113883.6.12": "http://www.ama-assn.org/go/cpt",
    "urn:oid:2.16.840.1.113883.6.285": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
    "urn:oid:2.16.840.1.113883.6.4": "http://www.cms.gov/Medicare/Coding/ICD10",
    "urn:oid:2.16.840.1.113883.12.292": "http://hl7.org/fhir/sid/cvx",
    "urn:oid:2.16.840.1.113883.6.69": "http://hl7.org/fhir/sid/ndc",
    "http://www.cms.gov/Medicare/Coding/ICD10": "http://www.cms.gov/Medicare/Coding/ICD10",
    "http://hl7.org/fhir/sid/icd-10-pcs": "http://www.cms.gov/Medicare/Coding/ICD10",
    "http://www.nlm.nih.gov/research/umls/rxnorm/": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "http://snomed.info/sct/": "http://snomed.info/sct",
    "https://loinc.org": "http://loinc.org",
}


def canonical_system(system: str) -> str:
    return SYSTEM_ALIASES.get(system, system)


def canonicalize(value: Any) -> None:
    """Every `system` in a resource under its canonical URI, in place, so FHIRPath that names a system
    (`coding.where(system = 'http://loinc.org')`) reads it whichever name the sender used. A loop over a
    stack, classes compared before isinstance: it walks every node of each resource FHIRPath reads, on
    every call, and most nodes are strings."""
    stack, aliases = [value], SYSTEM_ALIASES
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        if node.__class__ is dict or (node.__class__ is not list and isinstance(node, dict)):
            system = node.get("system")
            if system.__class__ is str and system in aliases:
                node["system"] = aliases[system]
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        for item in children:
            kind = item.__class__
            if kind is dict or kind is list or (kind is not str and isinstance(item, dict | list)):
                push(item)


# -- elements, codings, words -----------------------------------------------------------------------
def walk(resource: Resource, path: str) -> Iterator[Any]:
    """Values at a dotted path, flattening lists on the way."""
    if "." not in path:  # one element, the common case: no lists built
        if isinstance(resource, dict) and path in resource:
            child = resource[path]
            yield from child if isinstance(child, list) else (child,)
        return
    values: list[Any] = [resource]
    for part in path.split("."):
        nxt: list[Any] = []
        for value in values:
            if isinstance(value, dict) and part in value:
                child = value[part]
                nxt.extend(child if isinstance(child, list) else [child])
        values = nxt
    yield from values


def codings(concept: Any) -> Iterator[tuple[str, str]]:
    """(system, code) of a CodeableConcept's well-formed codings, each system under its canonical URI."""
    if isinstance(concept, dict):
        for coding in concept.get("coding") or ():
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if isinstance(system, str) and isinstance(code, str):
                    yield SYSTEM_ALIASES.get(system, system), code


def referenced_medication(resource: Resource, medications: dict[str, Resource] | None = None) -> Resource | None:
    """The Medication a medication[x] resource names by reference: contained (`#id`), or `Medication/id`
    among `medications` (the record's own Medication resources, by id)."""
    reference = resource.get("medicationReference")
    ref = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(ref, str):
        return None
    if ref.startswith("#"):
        for contained in resource.get("contained") or ():
            if isinstance(contained, dict) and contained.get("id") == ref[1:] and \
                    contained.get("resourceType") == "Medication":
                return contained
        return None
    parsed = parse_reference(ref)
    if parsed is None or parsed.type != "Medication" or not medications:
        return None
    return medications.get(parsed.id)


def concepts(resource: Resource, medications: dict[str, Resource] | None = None) -> Iterator[Any]:
    """The CodeableConcepts that say what a resource is (CODE_ELEMENTS), a referenced Medication's code
    included: an order coded by reference is the same order as one coded inline."""
    for path in CODE_ELEMENTS.get(resource.get("resourceType", ""), ()):
        yield from walk(resource, path)
    if resource.get("resourceType") in MEDICATION_TYPES:
        medication = referenced_medication(resource, medications)
        if medication is not None:
            yield medication.get("code")


def words(resource: Resource, medications: dict[str, Resource] | None = None) -> Iterator[str]:
    """The human-readable text of a resource: its code elements' text and displays, notes, strings."""
    for concept in concepts(resource, medications):
        if isinstance(concept, dict):
            if isinstance(concept.get("text"), str):
                yield concept["text"]
            for coding in concept.get("coding") or ():
                if isinstance(coding, dict) and isinstance(coding.get("display"), str):
                    yield coding["display"]
    for note in resource.get("note") or ():
        if isinstance(note, dict) and isinstance(note.get("text"), str):
            yield note["text"]
    if isinstance(resource.get("valueString"), str):
        yield resource["valueString"]
    reference = resource.get("medicationReference")
    if isinstance(reference, dict) and isinstance(reference.get("display"), str):
        yield reference["display"]  # the order's drug by name, when the Medication itself was not sent


# -- languages --------------------------------------------------------------------------------------------
BCP47 = "urn:ietf:bcp:47"
# Registration screens often store a language as text only ("Spanish", "Vietnamese"). Names of the languages
# most spoken at home by US patients with limited English (American Community Survey), in English and as
# written by their speakers, with their BCP-47 codes: enough for a rule to compare a patient's language with
# a document's `language` code.
LANGUAGE_NAMES: dict[str, str] = {
    "english": "en", "spanish": "es", "espanol": "es", "español": "es", "castellano": "es",
    "chinese": "zh", "mandarin": "zh", "cantonese": "yue", "vietnamese": "vi", "tieng viet": "vi",
    "tagalog": "tl", "filipino": "fil", "korean": "ko", "russian": "ru", "arabic": "ar", "french": "fr",
    "haitian creole": "ht", "haitian": "ht", "kreyol": "ht", "kreyòl": "ht", "portuguese": "pt",
    "portugues": "pt", "português": "pt", "german": "de", "polish": "pl", "italian": "it", "japanese": "ja",
    "persian": "fa", "farsi": "fa", "dari": "prs", "pashto": "ps", "somali": "so", "hmong": "hmn",
    "hindi": "hi", "urdu": "ur", "bengali": "bn", "bangla": "bn", "punjabi": "pa", "gujarati": "gu",
    "nepali": "ne", "amharic": "am", "tigrinya": "ti", "ukrainian": "uk", "armenian": "hy", "khmer": "km",
    "cambodian": "km", "lao": "lo", "laotian": "lo", "thai": "th", "burmese": "my", "karen": "kar",
    "swahili": "sw", "greek": "el", "hebrew": "he", "yiddish": "yi", "turkish": "tr", "romanian": "ro",
    "serbo croatian": "sh", "bosnian": "bs", "albanian": "sq", "telugu": "te", "tamil": "ta",
    "american sign language": "ase", "asl": "ase", "sign language": "sgn",
}
_WORDS = re.compile(r"[^a-zà-ÿ]+")


def language_code(text: Any) -> str | None:
    """The BCP-47 code of a language given by name ("Spanish", "Tiếng Việt (Vietnam)"), or None."""
    if not isinstance(text, str):
        return None
    words = _WORDS.sub(" ", text.lower().replace("ế", "e").replace("ệ", "e")).split()
    for size in range(min(3, len(words)), 0, -1):
        code = LANGUAGE_NAMES.get(" ".join(words[:size]))
        if code is not None:
            return code
    return None


def code_text_languages(patient: Resource) -> None:
    """Give a Patient's text-only languages their BCP-47 coding, in place, so rules compare codes whether a
    registration screen stored a code or a name. An unknown name is left as it is."""
    for communication in patient.get("communication") or ():
        language = communication.get("language") if isinstance(communication, dict) else None
        if isinstance(language, dict) and not language.get("coding"):
            code = language_code(language.get("text"))
            if code is not None:
                language["coding"] = [{"system": BCP47, "code": code, "display": language["text"]}]


# -- dates ----------------------------------------------------------------------------------------------
def parse_fhir_date(value: Any) -> datetime | None:
    """FHIR date/dateTime/instant at any precision ("2026", "2026-03", "2026-03-01T10:00:00Z"), in UTC."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) == 4:
            return datetime(int(value), 1, 1, tzinfo=UTC)
        if len(value) == 7:
            return datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=UTC)
        parsed = datetime.fromisoformat(value)  # 3.11+: any ISO 8601 form, "Z" included
    except ValueError:
        return None
    zone = parsed.tzinfo
    if zone is UTC:
        return parsed
    return parsed.replace(tzinfo=UTC) if zone is None else parsed.astimezone(UTC)


def resource_date(resource: Resource) -> datetime | None:
    """The type's usual clinical date (DATE_ELEMENTS), first present wins."""
    for path in _DATE_PATHS.get(resource.get("resourceType", ""), ()):
        if len(path) == 1:
            parsed = parse_fhir_date(resource.get(path[0]))
            if parsed is not None:
                return parsed
            continue
        for value in walk(resource, ".".join(path)):
            parsed = parse_fhir_date(value)
            if parsed is not None:
                return parsed
    return None


@functools.lru_cache(maxsize=4096)
def instant(value: datetime) -> str:
    """A datetime as a FHIR instant in UTC with "Z". Remembered: every call formats its clock, and a
    screening's calls share one."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- status -----------------------------------------------------------------------------------------------
def voided(resource: Resource) -> bool:
    """Entered in error, or a refuted condition/allergy: as if it had never been recorded."""
    if resource.get("status") == "entered-in-error":
        return True
    verification = resource.get("verificationStatus")
    found = verification.get("coding") if isinstance(verification, dict) else None
    return isinstance(found, list) and any(  # the code decides, whether or not a system is given
        isinstance(c, dict) and c.get("code") in ("entered-in-error", "refuted") for c in found)


# -- bundles -----------------------------------------------------------------------------------------------
def bundle(resources: Iterable[Resource], kind: str = "collection") -> Resource:
    return {"resourceType": "Bundle", "type": kind, "entry": [{"resource": r} for r in resources]}


def flatten(value: Any) -> Iterator[Resource]:
    """Resources in a prefetch value: a resource, or a Bundle's entries (OperationOutcomes dropped)."""
    if not isinstance(value, dict):
        return
    kind = value.get("resourceType")
    if kind == "Bundle":
        for entry in value.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") not in (None, "OperationOutcome"):
                yield resource
    elif isinstance(kind, str) and kind != "OperationOutcome":
        yield value


def operation_outcome(diagnostics: str, *, code: str = "exception", severity: str = "error",
                      expression: str | None = None) -> Resource:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}
