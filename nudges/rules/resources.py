"""FHIR R4 resources written in rule files (suggestion resources, inline case data) checked the way a
FHIR server would: the R4B model (fhir.resources: structure, types, cardinality) and, which the models
do not enforce, codes of required bindings (`intent: proposl`, `status: finalised`).

A typo in case data is worse than one in a rule: `performedDate` for `performedDateTime` quietly turns a
near miss into a false positive. So every problem names the element and, where there is one, the
nearest valid name or code.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class ResourceProblem:
    location: tuple[str | int, ...]  # within the resource
    message: str


def did_you_mean(word: str, choices: Collection[str]) -> str:
    """ " (did you mean 'x'?)" for the closest choice, or the one choice that contains the word (a rule id
    typed short: 'troponin' for 'troponin-without-cath-plan'), or "" when nothing is close."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    if not close and len(word) >= 3:
        close = [c for c in sorted(choices) if word.lower() in c.lower()]
        close = close if len(close) == 1 else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model(resource_type: str) -> type[BaseModel] | None:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        model: type[BaseModel] = get_fhir_model_class(resource_type)
        return model
    except (KeyError, ValueError):
        return None


def _element_names(model: type[BaseModel]) -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("element_property"):
            names.append(info.alias or name)
    return names


def check(resource: Any) -> list[ResourceProblem]:
    """Everything wrong with one resource (its first structural error, then every bad required code)."""
    if not isinstance(resource, dict):
        return [ResourceProblem((), "a resource must be a mapping")]
    kind = resource.get("resourceType")
    model = _model(kind) if isinstance(kind, str) else None
    if model is None:
        return [ResourceProblem(("resourceType",), f"'{kind}' is not a FHIR R4 resource type")]
    try:
        instance = model.model_validate(resource)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = tuple(p for p in error["loc"] if isinstance(p, str | int) and p != "__root__")
        if error["type"] == "extra_forbidden" and location:
            parent = _model_at(model, location[:-1])
            hint = did_you_mean(str(location[-1]), _element_names(parent)) if parent else ""
            return [ResourceProblem(location, f"unknown element '{location[-1]}'{hint}")]
        where = ".".join(str(p) for p in location)
        return [ResourceProblem(location, f"{where}: {error['msg']}" if where else error["msg"])]
    return list(_codes(instance, ()))


def _model_at(model: type[BaseModel], location: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The element model at a path of the resource (list indexes skipped), for "did you mean"."""
    current: type[BaseModel] | None = model
    for part in location:
        if current is None or isinstance(part, int):
            continue
        field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    klass = getattr(annotation, "get_model_klass", None)  # fhir.resources' element types (CodeableConceptType)
    if callable(klass):
        found = klass()
        return found if isinstance(found, type) and issubclass(found, BaseModel) else None
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


# fhir.resources takes its code lists from each element's short text, where the spec ends an abridged list
# with '+' ("registered | preliminary | final | amended +"); these are the required bindings' whole value
# sets (FHIR R4), so that `status: finalised` is refused on an Observation as on a Procedure.
_OBSERVATION_STATUS = "registered preliminary final amended corrected cancelled entered-in-error unknown"
_ENCOUNTER_STATUS = "planned arrived triaged in-progress onleave finished cancelled entered-in-error unknown"
_ABRIDGED = {
    ("Observation", "status"): _OBSERVATION_STATUS,
    ("DetectedIssue", "status"): _OBSERVATION_STATUS,
    ("RiskAssessment", "status"): _OBSERVATION_STATUS,
    ("DiagnosticReport", "status"): "registered partial preliminary final amended corrected appended cancelled "
                                    "entered-in-error unknown",
    ("Encounter", "status"): _ENCOUNTER_STATUS,
    ("EncounterStatusHistory", "status"): _ENCOUNTER_STATUS,
    ("DeviceUseStatement", "status"): "active completed entered-in-error intended stopped on-hold",
    ("DeviceUdiCarrier", "entryType"): "barcode rfid manual card self-reported unknown",
    ("QuestionnaireItem", "type"): "group display question boolean decimal integer date dateTime time string text "
                                   "url choice open-choice attachment reference quantity",
    ("SupplyRequest", "status"): "draft active suspended cancelled completed entered-in-error unknown",
    ("Task", "status"): "draft requested received accepted rejected ready cancelled in-progress on-hold failed "
                        "completed entered-in-error",
    ("StructureMapGroupRuleTarget", "transform"): "create copy truncate escape cast append translate reference "
                                                  "dateOp uuid pointer evaluate cc c qty id cp",
}


def _codes(instance: BaseModel, location: tuple[str | int, ...]) -> Iterator[ResourceProblem]:
    """Codes outside a required binding's list (fhir.resources knows the lists; an abridged one, ending
    with '+', is completed from _ABRIDGED, or not checked)."""
    for name, info in type(instance).model_fields.items():
        value = getattr(instance, name, None)
        if value is None:
            continue
        element = info.alias or name
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        listed = extra.get("enum_values")
        allowed = [str(v) for v in listed] if isinstance(listed, list) else None
        if allowed is not None and "+" in allowed:
            whole = _ABRIDGED.get((type(instance).__name__, name))
            allowed = whole.split() if whole else allowed
        values = value if isinstance(value, list) else [value]
        for i, item in enumerate(values):
            at = (*location, element, i) if isinstance(value, list) else (*location, element)
            if isinstance(item, BaseModel):
                yield from _codes(item, at)
            elif allowed is not None and "+" not in allowed and isinstance(item, str) and item not in allowed:
                yield ResourceProblem(at, f"'{item}' is not a code of {element} (one of: {', '.join(allowed)})"
                                          f"{did_you_mean(item, allowed)}")
