"""`nudges new rule`: a rule, its cases and its value set that lint clean and pass, with comments that teach
the format. The rule is `experimental` (not served) until its author replaces every REPLACE and makes it
`active`; lint warns while any REPLACE is left (rules.schema.PLACEHOLDER_MARK).

Two shapes, by hook: on a chart or encounter hook, "a recent finding with no follow-up since"; on an order
hook, "an order with no recent result". Both cases are written at a pinned `now`: one that fires and the
near miss its author edits into the closest case where the rule must stay quiet.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from ..fhir import instant
from ..rules.schema import PLACEHOLDER_MARK

EXAMPLE_SYSTEM = "urn:nudges:replace-me"  # the example code's system: obviously not a real one

HEADER = """\
# A nudges rule: one YAML file named by its id, its test cases beside it (__ID__.cases.yaml).
#   nudges lint __RULES__                          check every file (problems as file:line:column)
#   nudges test __RULES__/__AREA__/__ID__.yaml -v    run this rule's cases
#   nudges explain __RULES__/__AREA__/__ID__.cases.yaml   why each case fires or not, clause by clause
# Replace every REPLACE (lint warns while one is left), then set `status: active` to serve it.
id: __ID__                           # kebab-case; equals the file name
title: REPLACE with what this rule nudges about, in a few words
status: experimental                 # experimental | test | active | deprecated (only active is served)
version: 0.1.0                       # semver: bump when the rule changes meaning
hooks: [__HOOK__]                    # patient-view encounter-start encounter-discharge order-select order-sign
                                     # appointment-book
topic: __TOPIC__                     # card.source.topic: one of ruleset.yaml's topics
__TOPICS__owner: REPLACE-with-the-owning-team
"""

RECORD_WHEN = """\
when:                                # every part given must hold: age, patient, all, any, none
  # age: {min: 18}                   # whole years, inclusive
  all:                               # each item must match a resource of the record
    - as: finding                    # bind the latest match: card text can say {{finding.elapsed}}
      resource: Observation          # a FHIR R4 resource type
      codes: __ID__                  # a value set: valuesets/__ID__.yaml (replace its example code)
      within: 30d                    # dated no earlier than 30 days ago (units min, h, d, w, mo, y)
      # where: "(value as Quantity).value > referenceRange.high.value"   # FHIRPath on each candidate
  none:                              # absence: no item may match
    - resource: ServiceRequest
      text: follow.?up               # case-insensitive regular expression over code text, displays, notes
      since: finding                 # dated at or after the bound finding
card:
  summary: "REPLACE: finding {{finding.elapsed}} ago with no follow-up ordered"   # under 140 characters
"""

ORDER_WHEN = """\
when:                                # every part given must hold: age, patient, all, any, none
  all:
    - as: order                      # bind the order being placed: card text can say {{order.display}}
      resource: ServiceRequest
      # source: selected = what the clinician picked (order-select); draft = every draft order of the
      # call (order-sign); record = the patient's record (the default); any = record and drafts
      source: __SOURCE__
      codes: __ID__                  # a value set: valuesets/__ID__.yaml (replace its example code)
  none:                              # absence: no item may match
    - resource: Observation
      codes: __ID__                  # a result of the same test
      within: 30d                    # dated no earlier than 30 days ago (units min, h, d, w, mo, y)
card:
  summary: "REPLACE: {{order.display}} ordered with no result in the past 30 days"   # under 140 characters
"""

CARD = """\
  indicator: info                    # info | warning | critical
  detail: |                          # markdown for the clinician: what to consider, and why
    REPLACE with what the clinician should consider, and why.
  suggestions:                       # optional: actions the EHR can take in one click
    - label: Order follow-up
      actions:
        - type: create
          description: Follow-up order
          resource:                  # FHIR R4 (lint validates it); placeholders such as {{context.patientId}}
            resourceType: ServiceRequest
            status: draft
            intent: proposal
            subject: {reference: "Patient/{{context.patientId}}"}
            code: {text: Follow-up}
  # links: [{label: Guideline, url: "https://example.org/guideline"}]
  # override_reasons: [patient-declined]   # HL7 non-adherence reason codes
rationale: REPLACE in plain language - why this nudge exists and which gap in care it narrows.
citations:                           # {seed: record-id#p1} (a seeds/ passage), {evidence: id}, or title + doi/url
  - title: REPLACE with the guideline or study this rule rests on
    url: https://example.org/replace-me
falsepositives:                      # known situations where it fires wrongly
  - REPLACE with a situation where this fires but should not
suppress: 7d                         # not shown again to the same patient for this long
"""

CASES_HEADER = """\
# Cases for __ID__: each runs the rule alone at `now`, through the same pipeline as a hook call.
# `expect: [...]` is the card it must raise; `expect: []` means it must not fire. An active rule needs
# at least one of each. Resources are inline FHIR R4 (lint validates them), or `bundle: path/to/Bundle.json`.
rule: __ID__
now: "__NOW__"               # every case runs at this pinned instant
cases:
"""

PATIENT = """\
      - {resourceType: Patient, id: pt-1, birthDate: "1970-01-01"}
"""
ENCOUNTER = """\
      - resourceType: Encounter
        id: enc-1
        status: in-progress
        class: {system: "http://terminology.hl7.org/CodeSystem/v3-ActCode", code: AMB}
        subject: {reference: Patient/pt-1}
        period: {start: "__TODAY_START__"}
"""
FINDING = """\
      - resourceType: Observation
        id: finding-1
        status: final
        code: {coding: [{system: "__SYSTEM__", code: example-code}]}
        subject: {reference: Patient/pt-1}
        effectiveDateTime: "__DAYS_AGO_3__"
"""
FOLLOW_UP = """\
      - resourceType: ServiceRequest        # EDIT: the closest situation where the rule must stay quiet
        id: follow-up-1
        status: active
        intent: order
        subject: {reference: Patient/pt-1}
        code: {text: Follow-up visit}
        authoredOn: "__DAYS_AGO_2__"
"""
APPOINTMENT = """\
    appointments:                    # the appointment being booked
      - resourceType: Appointment
        id: appt-1
        status: proposed
        participant: [{actor: {reference: Patient/pt-1}, status: needs-action}]
"""
DRAFT_ORDER = """\
    draft_orders:                    # the orders being placed (order-select selects them all by default)
      - resourceType: ServiceRequest
        id: draft-1
        status: draft
        intent: order
        subject: {reference: Patient/pt-1}
        code: {coding: [{system: "__SYSTEM__", code: example-code, display: Example test}]}
        authoredOn: "__NOW__"
"""
RECENT_RESULT = """\
      - resourceType: Observation           # EDIT: the closest situation where the rule must stay quiet
        id: result-1
        status: final
        code: {coding: [{system: "__SYSTEM__", code: example-code}]}
        subject: {reference: Patient/pt-1}
        effectiveDateTime: "__DAYS_AGO_5__"
"""

VALUESET = """\
# The codes rule __ID__ matches (`codes: __ID__`). Replace the example code with real ones: an absolute
# system URI (http://loinc.org, http://snomed.info/sct, http://www.nlm.nih.gov/research/umls/rxnorm, ...),
# the code and its display. A FHIR R4 ValueSet exported from VSAC may replace this file as
# valuesets/__ID__.json (`nudges valueset import FILE --to __RULES__`).
name: __ID__
title: REPLACE with what these codes are
source: REPLACE with where the codes came from (a VSAC OID and expansion date, a code system browser)
version: "0.1"
date: "__TODAY__"                    # when the codes were last checked
codes:
  - {system: "__SYSTEM__", code: example-code, display: REPLACE with the code's display}
"""

ORDER_HOOKS = ("order-select", "order-sign")


@dataclass(frozen=True)
class Scaffold:
    rule: Path
    cases: Path
    valueset: Path

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return self.rule, self.cases, self.valueset


class ScaffoldError(Exception):
    """A rule that cannot be created as asked (its files exist, no such topic, no rule set)."""


def plan(rules: Path, rule_id: str, area: str) -> Scaffold:
    return Scaffold(rules / area / f"{rule_id}.yaml", rules / area / f"{rule_id}.cases.yaml",
                    rules / "valuesets" / f"{rule_id}.yaml")


def texts(rule_id: str, area: str, hook: str, topic: str, topics: list[str], now: datetime,
          rules_label: str) -> tuple[str, str, str]:
    """The rule, cases and value-set files' text."""
    now = now.replace(minute=0, second=0, microsecond=0)
    order = hook in ORDER_HOOKS
    rule = HEADER + (ORDER_WHEN if order else RECORD_WHEN) + CARD
    if order:
        fires_name, quiet_name = "order with no result in 30 days", "near miss - a result 5 days ago"
        fires, quiet = PATIENT, PATIENT + RECENT_RESULT
        expect = '      - indicator: info\n        summary_contains: "ordered with no result"\n'
    else:
        fires_name, quiet_name = "finding 3 days ago, nothing ordered", "near miss - follow-up ordered after it"
        extra = ENCOUNTER if hook.startswith("encounter-") else ""
        fires, quiet = PATIENT + extra + FINDING, PATIENT + extra + FINDING + FOLLOW_UP
        expect = '      - indicator: info\n        summary_contains: "no follow-up ordered"\n'
    context = DRAFT_ORDER if order else APPOINTMENT if hook == "appointment-book" else ""
    cases = CASES_HEADER
    for name, resources, expected in ((fires_name, fires, expect), (quiet_name, quiet, None)):
        cases += f"  - name: {name}\n    hook: {hook}\n    resources:\n{resources}{context}"
        cases += f"    expect:\n{expected}" if expected else "    expect: []\n"
    values = {"__ID__": rule_id, "__AREA__": area, "__HOOK__": hook, "__TOPIC__": topic, "__RULES__": rules_label,
              "__SYSTEM__": EXAMPLE_SYSTEM,
              "__SOURCE__": "selected" if hook == "order-select" else "draft", "__NOW__": instant(now),
              "__TODAY__": now.date().isoformat(),
              "__TODAY_START__": instant(now.replace(hour=0)),
              **{f"__DAYS_AGO_{n}__": instant(now - timedelta(days=n)) for n in (2, 3, 5)}}
    wrapped = textwrap.wrap(", ".join(topics), 100, break_on_hyphens=False)
    values["__TOPICS__"] = "".join(f"#   {line}\n" for line in wrapped)
    out = []
    for text in (rule, cases, VALUESET):
        for token, value in values.items():
            text = text.replace(token, value)
        out.append(align(text))
    assert all(PLACEHOLDER_MARK in text for text in (out[0], out[2]))
    return out[0], out[1], out[2]


_COMMENTED = re.compile(r"^(\s*\S.*?)\s{2,}(# .*)$")
COMMENT_COLUMN = 37


def align(text: str) -> str:
    """Line the trailing comments up again once the placeholders have their values."""
    lines = []
    for line in text.splitlines():
        found = _COMMENTED.match(line)
        if found and not line.lstrip().startswith("#") and '"' not in found.group(2):
            line = f"{found.group(1):<{COMMENT_COLUMN - 1}} {found.group(2)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write(rules: Path, rule_id: str, area: str, hook: str, topic: str | None, now: datetime,
          rules_label: str) -> Scaffold:
    """Write the three files, refusing to overwrite any, after checking the rule set can take them."""
    from ..rules import yamlfiles
    from ..rules.resources import did_you_mean
    from ..rules.schema import RuleSetManifest

    manifest_path = rules / "ruleset.yaml"
    if not manifest_path.is_file():
        raise ScaffoldError(f"no rule set at {rules_label} (no ruleset.yaml): pass --rules DIR")
    document, _ = yamlfiles.load(manifest_path, str(manifest_path))
    manifest = yamlfiles.validate(RuleSetManifest, document, str(manifest_path))[0] if document else None
    if manifest is None:
        raise ScaffoldError(f"{manifest_path} has problems: run nudges lint {rules_label}")
    topics = list(manifest.topics)
    topic = topic or (topics[0] if topics else "")
    if topic not in manifest.topics:
        raise ScaffoldError(f"topic '{topic}' is not listed in {manifest_path}{did_you_mean(topic, topics)} "
                            f"(topics: {', '.join(topics) or 'none'})")
    target = plan(rules, rule_id, area)
    existing = [str(p) for p in target.files if p.exists()]
    clash = [str(p) for p in rules.rglob(f"{rule_id}.yaml") if p.parent.name != "valuesets"]
    if existing or clash:
        raise ScaffoldError(f"{', '.join(sorted(set(existing + clash)))} already exists: choose another id")
    for path, text in zip(target.files, texts(rule_id, area, hook, topic, topics, now, rules_label), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target
