"""The demographic bucket recorded with each card, for the equity audit only.

Never an input to a rule: cards must not depend on race or ethnicity. Categories come from the US
Core race/ethnicity extensions (OMB categories), the preferred language and the payer class.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .store import Bucket

US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
OMB = {
    "1002-5": "american-indian-alaska-native", "2028-9": "asian", "2054-5": "black",
    "2076-8": "native-hawaiian-pacific-islander", "2106-3": "white", "2131-1": "other",
    "2135-2": "hispanic-latino", "2186-5": "not-hispanic-latino",
    "UNK": "unknown", "ASKU": "declined",
}
# PHIN/SOP payer typology top-level codes, and HL7 v3 ActCode coverage types.
PAYER = {"1": "medicare", "2": "medicaid", "3": "other-government", "4": "other-government",
         "5": "private", "6": "private", "7": "managed-care", "8": "self-pay", "81": "self-pay",
         "82": "self-pay", "9": "other", "PUBLICPOL": "public", "EHCPOL": "private", "HIP": "private",
         "SUBSIDIZ": "public", "pay": "self-pay", "PAY": "self-pay"}


def _omb_categories(patient: dict[str, Any], url: str) -> list[str]:
    found = []
    for ext in patient.get("extension") or ():
        if not isinstance(ext, dict) or ext.get("url") != url:
            continue
        for sub in ext.get("extension") or ():
            if isinstance(sub, dict) and sub.get("url") == "ombCategory":
                coding = sub.get("valueCoding")
                code = coding.get("code") if isinstance(coding, dict) else None
                if code in OMB:
                    found.append(OMB[code])
    return sorted(set(found))


def _category(values: list[str]) -> str:
    if not values:
        return "unknown"
    return values[0] if len(values) == 1 else "multiple"


def preferred_language(patient: dict[str, Any]) -> str:
    communications = [c for c in patient.get("communication") or () if isinstance(c, dict)]
    chosen = next((c for c in communications if c.get("preferred") is True), None)
    chosen = chosen or (communications[0] if communications else None)
    if chosen is None:
        return "unknown"
    language = chosen.get("language")
    for coding in (language.get("coding") or () if isinstance(language, dict) else ()):
        code = coding.get("code") if isinstance(coding, dict) else None
        if isinstance(code, str) and code:
            return code.split("-")[0].lower()
    return "unknown"


def payer_class(coverages: Iterable[dict[str, Any]]) -> str:
    active = [c for c in coverages if c.get("resourceType") == "Coverage" and c.get("status", "active") == "active"]
    if not active:
        return "uninsured-or-unknown"
    # the primary coverage decides (Coverage.order, 1 first), then the lowest id: never the order resources
    # arrived in, which a prefetch or an export's files do not fix (the equity view moved with file order)
    active.sort(key=lambda c: (c["order"] if isinstance(c.get("order"), int) and not isinstance(c["order"], bool)
                               else 1 << 30, str(c.get("id", ""))))
    for coverage in active:
        kind = coverage.get("type")
        for coding in (kind.get("coding") or () if isinstance(kind, dict) else ()):
            code = coding.get("code") if isinstance(coding, dict) else None
            if code in PAYER:
                return PAYER[code]
            if isinstance(code, str) and code[:1] in PAYER and code[:1].isdigit():
                return PAYER[code[:1]]
    return "other"


def bucket(patient: dict[str, Any] | None, coverages: Iterable[dict[str, Any]]) -> Bucket:
    if not patient:
        return Bucket(payer_class=payer_class(coverages))
    return Bucket(race=_category(_omb_categories(patient, US_CORE_RACE)),
                  ethnicity=_category(_omb_categories(patient, US_CORE_ETHNICITY)),
                  language=preferred_language(patient), payer_class=payer_class(coverages))
