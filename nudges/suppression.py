"""Alert fatigue: what a card is about (its focus), and how long feedback keeps a card about it away.

A card is held back per patient, rule and focus, where the focus follows the hook (`Hook.focus` in
hooks.py, the one table of hooks): the chart (patient-view), the encounter (encounter-start and
-discharge), the draft order (order-select, order-sign), the appointment (appointment-book). So the
interpreter card shown as an encounter starts is shown again when a follow-up visit is booked, and a
second, different order gets its own card while signing the order selected a minute ago does not repeat
it.

How long: a card nobody answered holds its focus only briefly (`suppression.ignored`, minutes: enough to
stop repeats on a chart refresh; a card the EHR never displayed is this case too). Feedback then decides
(the latest outcomeTimestamp wins, store.feedback_statement): accepted keeps the card away for the rule's
`suppress` window (else `suppression.accepted`); overridden with a reason for that reason's lockout from
the rule file (`override_reasons: {patient-refuses: 30d}`), else the rule's `suppress`, else
`suppression.overridden`; the service's own "remind me later" reason, offered on every card that has
override reasons, is a snooze (`suppression.snooze`). A rule is never silenced for its override rate:
that is for governance to read (`nudges audit --overrides`), not for the service to act on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .errors import BadRequest
from .fhir import concepts, reference_of, walk
from .hooks import Hook
from .rules.compiled import CompiledRule
from .rules.valuesets import REASON_SYSTEM, REMIND_LATER
from .settings import SuppressionSettings
from .store import FeedbackRecord, IssuedRow, Lockout

PATIENT_FOCUS = "patient"  # the focus text of a chart-level card (and of a follow-up card)
NO_REASON = "none"  # metrics label of an override without a coded reason
OTHER_REASON = "other"  # metrics label of a code the rule does not (or no longer) offer


def order_identity(resource: dict[str, Any], medications: dict[str, dict[str, Any]] | None = None) -> str:
    """A draft order as the clinician sees it: its type and its codes (a referenced Medication's code
    included; the code's text when it has no coding), not its id, which an EHR may mint afresh between
    order-select and order-sign."""
    coded: set[str] = set()
    texts: set[str] = set()
    for concept in concepts(resource, medications):
        if not isinstance(concept, dict):
            continue
        for coding in concept.get("coding") or ():
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                coded.add(f"{coding.get('system') or ''}|{coding['code']}")
        if isinstance(concept.get("text"), str) and concept["text"].strip():
            texts.add(" ".join(concept["text"].lower().split()))
    what = sorted(coded) or sorted(texts) or [f"id:{resource.get('id')}"]
    return f"{resource.get('resourceType')}:{','.join(what)}"


def appointment_identity(resource: dict[str, Any]) -> str:
    """An appointment by its id; one without an id (a proposal) by its type and start."""
    if isinstance(resource.get("id"), str):
        return reference_of(resource)
    kinds = sorted(f"{s}|{c}" for element in ("appointmentType", "serviceType")
                   for concept in walk(resource, element) for s, c in _codings(concept))
    return f"Appointment:{','.join(kinds)}@{resource.get('start')}"


def _codings(concept: Any) -> Iterable[tuple[str, str]]:
    if isinstance(concept, dict):
        for coding in concept.get("coding") or ():
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                yield str(coding.get("system") or ""), coding["code"]


def focus_of(hook: Hook, context: dict[str, Any], matched: Iterable[dict[str, Any]],
             drafts: list[dict[str, Any]], medications: dict[str, dict[str, Any]] | None = None) -> str:
    """The focus text of a card on `hook` (see the module docstring; hashed with the service's key before
    it is stored). `matched` are the draft resources the rule's clauses matched; when the rule matched
    none (it fired on the record alone), the call's drafts (order-select: the selected ones) stand in."""
    if hook.focus == "patient":
        return PATIENT_FOCUS
    if hook.focus == "encounter":
        return f"encounter:{context.get('encounterId') or ''}"
    own = list(matched) or drafts
    if hook.focus == "order":
        return "order:" + ";".join(sorted({order_identity(r, medications) for r in own}))
    return "appointment:" + ";".join(sorted({appointment_identity(r) for r in own}))


def offered(rule: CompiledRule) -> dict[tuple[str, str], timedelta | None]:
    """The override reasons a rule's cards offer, each with its own lockout (None: the default), the
    service's remind-me-later among them whenever the rule offers any."""
    reasons = {(r["system"], r["code"]): lockout
               for r, lockout in zip(rule.card.override_reasons, rule.card.override_lockouts, strict=True)}
    if reasons:
        reasons[REMIND_LATER["system"], REMIND_LATER["code"]] = None
    return reasons


def reason_key(rule: CompiledRule | None, system: str | None, code: str) -> tuple[str, str] | None:
    """The offered (system, code) a feedback reason names: the system may be left out when the code
    alone is unambiguous among the card's reasons. None when the card does not offer it."""
    if rule is None:
        return None
    choices = [key for key in offered(rule) if key[1] == code and (system is None or key[0] == system)]
    return choices[0] if len(choices) == 1 else None


def check_reason(rule: CompiledRule | None, record: FeedbackRecord) -> FeedbackRecord:
    """The feedback with its reason's system filled in; a 400 naming what the card does offer when the
    reason is not one of them (nothing is stored). A card whose rule is no longer served cannot be checked
    and is taken as it is."""
    if record.override_code is None or rule is None:
        return record
    key = reason_key(rule, record.override_system, record.override_code)
    if key is None:
        choices = ", ".join(f"{s}|{c}" for s, c in offered(rule)) or "none"
        named = f"{record.override_system}|{record.override_code}" if record.override_system else \
            record.override_code
        raise BadRequest(f"card '{record.card_uuid}' does not offer the override reason '{named}' "
                         f"(it offers: {choices})", expression="feedback.overrideReason.reason")
    if record.override_system == key[0]:
        return record
    from dataclasses import replace

    return replace(record, override_system=key[0])


@dataclass(frozen=True)
class Policy:
    """Settings and a rule's file, turned into how long one piece of feedback keeps its focus quiet."""

    settings: SuppressionSettings

    def lockout(self, rule: CompiledRule | None, record: FeedbackRecord) -> timedelta:
        if record.outcome == "accepted":
            return (rule.suppress if rule else None) or self.settings.accepted_window
        if record.override_code == REMIND_LATER["code"] and record.override_system == REASON_SYSTEM:
            return self.settings.snooze_window
        own = None
        if rule is not None and record.override_code is not None:
            own = offered(rule).get((record.override_system or "", record.override_code))
        return own or (rule.suppress if rule else None) or self.settings.overridden_window

    def of(self, rule: CompiledRule | None, card: IssuedRow, focus: str, record: FeedbackRecord,
           now: datetime) -> Lockout:
        """The lockout starts at the outcome's time, never later than its arrival (a clock running ahead
        in the EHR must not stretch it)."""
        start = min(record.outcome_timestamp, now)
        return Lockout(card.patient_hash, card.rule_id, focus, start + self.lockout(rule, record),
                       record.override_code)


def reason_label(rule: CompiledRule | None, record: FeedbackRecord) -> str:
    """A bounded metrics label: a code the rule offers, `none`, or `other`."""
    if record.override_code is None:
        return NO_REASON
    if rule is not None and (record.override_system or "", record.override_code) in offered(rule):
        return record.override_code
    return OTHER_REASON
