"""Turn a rule match into a CDS Hooks 2.0 card: fresh uuids, placeholders filled, no empty values."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from .engine import Match, age_in_years
from .fhir import codings, instant, parse_fhir_date, referenced_medication
from .rules.compiled import RuleSet
from .rules.templates import pieces, shown_sections
from .rules.valuesets import REMIND_LATER
from .store import CardRecord

SEVERITY = {"critical": 0, "warning": 1, "info": 2}
MAX_SUMMARY = 139
# The console's page for one rule (api/console serves it): where a card's "Why this nudge" link points.
WHY_PATH = "/console/rules/{rule}"
WHY_LABEL = "Why this nudge"


def why_link(base: str, rule_id: str) -> dict[str, str]:
    """The link from a card to its rule's page (rationale, evidence, source attributes), so a clinician can
    see why a nudge appeared; `base` is the service's public URL, the only one a clinician's browser can
    reach (the request's own host may be an internal name behind the proxy)."""
    return {"label": WHY_LABEL, "url": base.rstrip("/") + WHY_PATH.format(rule=rule_id), "type": "absolute"}


def elapsed(delta_seconds: float) -> str:
    minutes = int(max(delta_seconds, 0) // 60)
    if minutes < 90:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h"
    return f"{hours // 24} days"


def _display(resource: dict[str, Any], displays: dict[tuple[str, str], str],
             medications: dict[str, dict[str, Any]] | None = None) -> str:
    """What a bound resource is, in words: the value set's display for its code, else the code's own
    display or text; an order coded by reference is named by its Medication."""
    medication = referenced_medication(resource, medications) if "medicationReference" in resource else None
    if medication is not None:
        resource = {"resourceType": resource.get("resourceType"), "code": medication.get("code")}
    for element in ("code", "medicationCodeableConcept", "vaccineCode", "type"):
        concept = resource.get(element)
        if isinstance(concept, list):
            concept = concept[0] if concept else None
        if not isinstance(concept, dict):
            continue
        for key in codings(concept):
            if key in displays:
                return displays[key]
        for coding in concept.get("coding") or ():
            if isinstance(coding, dict) and coding.get("display"):
                return str(coding["display"])
        if concept.get("text"):
            return str(concept["text"])
    return resource.get("resourceType", "record")


def _value(resource: dict[str, Any]) -> str:
    quantity = resource.get("valueQuantity")
    if isinstance(quantity, dict) and "value" in quantity:
        unit = quantity.get("unit") or quantity.get("code") or ""
        return f"{quantity['value']} {unit}".strip()
    for key in ("valueString", "valueInteger", "valueBoolean"):
        if key in resource:
            return str(resource[key])
    concept = resource.get("valueCodeableConcept")
    if isinstance(concept, dict):
        return str(concept.get("text") or next((c.get("display") for c in concept.get("coding") or ()
                                                if c.get("display")), "coded value"))
    return "not recorded"


class Renderer:
    """Fills placeholders for one call; values are computed only when a template asks for them."""

    def __init__(self, match: Match, context: dict[str, Any], patient: dict[str, Any] | None,
                 now: datetime, medications: dict[str, dict[str, Any]] | None = None) -> None:
        self.match, self.context, self.patient, self.now = match, context, patient, now
        self.medications = medications

    def value(self, name: str) -> str:
        if name.startswith("context."):
            return str(self.context.get(name[8:], ""))
        if name == "now":
            return instant(self.now)
        if name == "today":
            return self.now.date().isoformat()
        if name == "patient.reference":
            return f"Patient/{self.context.get('patientId', '')}"
        if name == "patient.age":
            birth = parse_fhir_date((self.patient or {}).get("birthDate"))
            return str(age_in_years(birth.date(), self.now.date())) if birth else "unknown"
        bind, _, attr = name.partition(".")
        resource = self.match.bindings.get(bind, {})
        when = self.match.dates.get(bind)
        if attr == "elapsed":
            return elapsed((self.now - when).total_seconds()) if when else "an unknown time"
        if attr == "date":
            return when.strftime("%Y-%m-%d %H:%M UTC") if when else "an unknown date"
        if attr == "display":
            clause = next((c for c in self.match.rule.clauses() if c.bind == bind), None)
            return _display(resource, clause.displays if clause else {}, self.medications)
        if attr == "value":
            return _value(resource)
        if attr == "id":
            return str(resource.get("id", ""))
        if attr == "reference":
            return f"{resource.get('resourceType')}/{resource.get('id')}"
        return ""

    def sections(self, template: str) -> str:
        """Keep {{#name}} sections when `name` was bound in this match, {{^name}} ones when not."""
        return shown_sections(template, self.match.bindings.__contains__)

    def text(self, template: str) -> str:
        if "{{" not in template:
            return template
        parts = pieces(self.sections(template))
        if len(parts) == 1:
            return parts[0]
        out = list(parts)
        for i in range(1, len(out), 2):
            out[i] = self.value(out[i])
        return "".join(out)

    def json(self, template: bytes) -> Any:
        if b"{{" not in template:
            return orjson.loads(template)
        out = list(pieces(template.decode()))
        for i in range(1, len(out), 2):
            out[i] = orjson.dumps(self.value(out[i])).decode()[1:-1]
        return orjson.loads("".join(out))


def indicator(match: Match, now: datetime) -> str:
    """The card's indicator, raised by `escalate` steps whose time has come since their bound resource."""
    template = match.rule.card
    shown = template.indicator
    for after, name, level in template.escalate:
        when = match.dates.get(name)
        if when is not None and now - when >= after:
            shown = level
    return shown


def summary_of(render: Renderer) -> str:
    """The card's summary, cut to the length CDS Hooks allows: the one rendering a card and a worklist share."""
    summary = render.text(render.match.rule.card.summary)
    return summary if len(summary) <= MAX_SUMMARY else summary[: MAX_SUMMARY - 1].rstrip() + "…"


def card_head(match: Match, context: dict[str, Any], patient: dict[str, Any] | None, now: datetime,
              medications: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a worklist shows of a card, its summary and indicator, as build_card renders them: population
    screening lists a card per patient and rule, and rendering the rest (the detail, suggestions with their
    random uuids, links) for every one of them was a tenth of its screening time."""
    return {"summary": summary_of(Renderer(match, context, patient, now, medications)),
            "indicator": indicator(match, now)}


def build_card(match: Match, ruleset: RuleSet, context: dict[str, Any], patient: dict[str, Any] | None,
               now: datetime, medications: dict[str, dict[str, Any]] | None = None,
               why_base: str | None = None, card_id: str | None = None) -> dict[str, Any]:
    """The card; with `why_base` (settings.public_base_url) its links end with "Why this nudge"; its uuid
    `card_id` when the caller derives one (pipeline.card_uuid), else a random one."""
    rule, template = match.rule, match.rule.card
    render = Renderer(match, context, patient, now, medications)
    summary = summary_of(render)
    manifest = ruleset.manifest
    source: dict[str, Any] = {"label": manifest.source_label,
                              "topic": {"system": manifest.topic_system, "code": rule.topic,
                                        "display": manifest.topics.get(rule.topic, rule.topic)}}
    if rule.source_url:
        source["url"] = rule.source_url
    card: dict[str, Any] = {"uuid": card_id or str(uuid.uuid4()), "summary": summary,
                            "indicator": indicator(match, now), "source": source}
    if template.detail:
        card["detail"] = render.text(template.detail)
    if template.suggestions_json is not None:
        suggestions = render.json(template.suggestions_json)
        for suggestion in suggestions:
            suggestion["uuid"] = str(uuid.uuid4())
        card["suggestions"] = suggestions
        card["selectionBehavior"] = template.selection
    if template.override_reasons:
        card["overrideReasons"] = [*(dict(r) for r in template.override_reasons), dict(REMIND_LATER)]
    links = [{k: render.text(v) if isinstance(v, str) else v for k, v in link.items()} for link in template.links]
    if why_base:
        links.append(why_link(why_base, rule.id))
    if links:
        card["links"] = links
    return card


@dataclass(frozen=True)
class IssuedCard:
    """A card in a response: the rule that raised it and, when this call issued it, the row to store
    (a waiting follow-up card was stored when it fired, so it has none) and the match it was built from
    (what made the rule fire: population screening lists it beside the card)."""

    rule_id: str
    card: dict[str, Any]
    record: CardRecord | None = None
    match: Match | None = None


def ordered(issued: list[IssuedCard]) -> list[IssuedCard]:
    """The one order of cards in every response: most severe first, then by rule id (stable)."""
    return sorted(issued, key=lambda i: (SEVERITY.get(i.card["indicator"], 3), i.rule_id))
