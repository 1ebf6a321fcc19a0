"""Value sets (named code lists) and the HL7 override-reason vocabulary cards offer."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Coding, ValueSet

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

    @classmethod
    def of(cls, model: ValueSet) -> CompiledValueSet:
        displays = {(c.system, c.code): c.display for c in model.codes}
        return cls(model.name, frozenset(displays), displays)

    def reads_race(self) -> bool:
        return any(system in RACE_SYSTEMS for system, _ in self.keys)
