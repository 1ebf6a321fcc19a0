"""The six CDS hooks this service answers, and everything that differs between them, in one table.

Context fields follow the CDS Hooks library (1.0.x); `focus` says what a card on that hook is about,
which is what suppression is keyed by (a chart, an encounter, a draft order, an appointment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

HookName = Literal["patient-view", "encounter-start", "encounter-discharge", "order-select", "order-sign",
                   "appointment-book"]


@dataclass(frozen=True)
class Hook:
    name: str
    version: str  # hookVersion in discovery
    required: tuple[str, ...]  # context fields a call must carry
    drafts: str | None  # the context Bundle of draft resources, if the hook has one
    focus: Literal["patient", "encounter", "order", "appointment"]
    description: str  # discovery text for the service on this hook

    @property
    def service_id(self) -> str:
        return f"nudges-{self.name}"

    @property
    def has_encounter(self) -> bool:
        return "encounterId" in self.required


HOOKS: dict[str, Hook] = {hook.name: hook for hook in (
    Hook("patient-view", "1.0", ("userId", "patientId"), None, "patient",
         "Health-equity nudges when a chart is opened: hidden cost barriers, screening for experiences of "
         "discrimination, trust, care gaps with navigation, person-first language."),
    Hook("encounter-start", "1.0", ("userId", "patientId", "encounterId"), None, "encounter",
         "Health-equity nudges as an encounter begins: interpreter needs, delays in time-critical care, "
         "screening prompts."),
    Hook("encounter-discharge", "1.0", ("userId", "patientId", "encounterId"), None, "encounter",
         "Discharge nudges: cardiac rehabilitation referral with barriers asked about, food insecurity "
         "screening, follow-up that fits the patient's circumstances."),
    Hook("order-select", "1.0.2", ("userId", "patientId", "selections", "draftOrders"), "draftOrders", "order",
         "Order nudges: race-free equations, coverage-driven de-escalation of guideline drugs, testing "
         "without a documented indication."),
    Hook("order-sign", "1.1.0", ("userId", "patientId", "draftOrders"), "draftOrders", "order",
         "Signing nudges: race-free equations, coverage-driven de-escalation of guideline drugs, testing "
         "without a documented indication, de-escalation before security involvement."),
    Hook("appointment-book", "1.0", ("userId", "patientId", "appointments"), "appointments", "appointment",
         "Booking nudges: professional interpreter and translated materials for patients who need them."),
)}
HOOK_NAMES: tuple[str, ...] = tuple(HOOKS)
# Hooks whose whole context a population screen can reconstruct from a patient's record alone.
RECORD_HOOKS: tuple[str, ...] = tuple(h.name for h in HOOKS.values() if h.drafts is None)


def service_hook(service_id: str) -> Hook | None:
    return next((h for h in HOOKS.values() if h.service_id == service_id), None)
