"""The rule file format. These pydantic models are the single source of truth: `nudges schema`
exports them as JSON Schema for editors, and the loader validates every rule file against them."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from ..hooks import HookName

Hook = HookName
Status = Literal["experimental", "test", "active", "deprecated"]
Indicator = Literal["info", "warning", "critical"]

_DURATION = re.compile(r"^(\d+)\s*(min|mo|m|h|d|w|y)$")
_UNITS = {"m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400, "y": 365 * 86400}
ID_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"
PLACEHOLDER_MARK = "REPLACE"  # what `nudges new rule` leaves for its author to fill in; lint points at each
PLACEHOLDER_MARKS = (PLACEHOLDER_MARK, "replace-me")  # ... and its example code system and citation URL


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"'{text}' is not a duration: use a number and a unit min, h, d, w, mo or y (e.g. 12h)")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _check_duration(text: str) -> str:
    parse_duration(text)
    return text


Duration = Annotated[str, AfterValidator(_check_duration),
                     Field(description="a number and a unit: min (or m), h, d, w, mo (30 days) or y (365 days), "
                           "e.g. 30min, 12h, 6mo, 10y",
                           # the exported JSON Schema refuses what lint refuses ("1 year", "30 days")
                           json_schema_extra={"pattern": r"^\s*\d+\s*(min|mo|m|h|d|w|y)\s*$"})]
FhirPath = Annotated[str, Field(min_length=1, description="a FHIRPath expression (use %now / %today)")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Clause(Strict):
    """One data requirement: resources of a type, optionally narrowed by codes, FHIRPath and time."""

    bind: str | None = Field(None, alias="as", pattern=r"^[a-z][a-z0-9_]*$",
                             description="name for the matched resource, usable in card text and `since`")
    resource: str = Field(description="FHIR R4 resource type, e.g. Observation")
    codes: str | None = Field(None, description="name of a value set in the valuesets folder")
    text: str | None = Field(
        None, description="case-insensitive regular expression searched in the resource's words (code text "
                          "and displays, notes, string values); with `codes`, a resource matching either one "
                          "is a candidate. Much cheaper than matching text in `where`")
    where: FhirPath | None = Field(None, description="FHIRPath evaluated on each candidate; must be true. "
                                                     "memberOf('value-set-name') tests codes against a value set")
    within: Duration | None = Field(None, description="the resource's date is no older than this")
    older_than: Duration | None = Field(None, description="the resource's date is at least this old")
    since: str | None = Field(None, description="only resources dated at or after this bound resource")
    date: FhirPath | None = Field(None, description="FHIRPath to the date, when not the type's usual one")
    pick: Literal["latest", "earliest"] = Field(
        "latest", description="which match a name binds when several resources match: the latest (default) or "
                              "the earliest, e.g. the first elevated result of an episode to anchor a clock on")
    source: Literal["record", "draft", "selected", "any"] = Field(
        "record", description="record: prefetch/FHIR server; draft: draftOrders or appointments in the "
                              "hook context; selected: order-select selections; any: both")
    required: bool = Field(
        True, description="false: read the record's resources of this type when the EHR sends them (or the "
                          "fhirServer gives them), without demanding them: unless another clause needs the type, "
                          "its prefetch key is not required, and a call without it is answered (this clause "
                          "then finds nothing) instead of refused with 412. For evidence many EHRs do not send "
                          "on a hook, such as an exclusion read from medication orders on patient-view")

    @field_validator("bind")
    @classmethod
    def _not_call_wide(cls, value: str | None) -> str | None:
        """A clause named `now` or `patient` would change what %now or %patient means in the clauses after it,
        for the reader of the rule and for the engine, which shares the answers of expressions that read
        only such names across a call (CompiledClause.settled, .dated)."""
        from .fhirpath import CALL_WIDE

        if value in CALL_WIDE:
            raise ValueError(f"'{value}' is a name every expression reads (%{value}): give the clause another name")
        return value


class AgeRange(Strict):
    min: int | None = Field(None, ge=0, description="inclusive, in whole years")
    max: int | None = Field(None, ge=0, description="inclusive, in whole years")


GROUP_KEYS = ("all", "any", "none")


def _item_kind(value: Any) -> str:
    """A list item is a nested group when it has a group key and no `resource`; otherwise a clause."""
    if isinstance(value, BaseModel):
        return type(value).__name__
    if isinstance(value, dict) and "resource" not in value and any(k in value for k in GROUP_KEYS):
        return "Group"
    return "Clause"


class Group(Strict):
    """A nested condition, for what one flat list cannot say: "A and (B or C)", "not (X and Y)"."""

    all: list[Item] | None = Field(None, min_length=1, description="each item must hold")
    any: list[Item] | None = Field(None, min_length=1, description="at least one item must hold")
    none: list[Item] | None = Field(None, min_length=1, description="no item may hold")

    @model_validator(mode="after")
    def _one_mode(self) -> Group:
        given = [k for k in GROUP_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a group has exactly one of all, any or none")
        if self.any is not None:
            _picks_alike(self.any)
        return self

    @property
    def mode(self) -> str:
        return next(k for k in GROUP_KEYS if getattr(self, k) is not None)

    @property
    def items(self) -> list[Item]:
        return getattr(self, self.mode)


Item = Annotated[Annotated[Clause, Tag("Clause")] | Annotated[Group, Tag("Group")], Discriminator(_item_kind)]


def _picks_alike(items: list[Clause | Group]) -> None:
    """Alternatives (below) pick alike: which of two matches the name binds must not hang on their order."""
    name = alternatives(items)
    if name and len({item.pick for item in items if isinstance(item, Clause)}) > 1:
        raise ValueError(f"the items of this `any` all bind '{name}': give them the same `pick` (latest or "
                         "earliest), which decides the match it binds")


def alternatives(items: list[Clause | Group]) -> str | None:
    """The name each of these `any` items binds, when every one is a clause binding the same name: the
    same fact recorded in different ways (a screen as an Observation or as a QuestionnaireResponse), bound
    whichever branch matched, so the name is bound whenever the `any` holds."""
    names = {item.bind if isinstance(item, Clause) else None for item in items}
    if len(items) < 2 or len(names) != 1:
        return None
    return names.pop()


# Tags of the unions above and of the delivery channels: they appear in validation error locations, and are
# not YAML keys.
UNION_TAGS = frozenset({"Clause", "Group", "ReasonList", "ReasonLockouts", "ReasonCode", "ReasonCoding",
                        "communication", "task", "webhook"})
Group.model_rebuild()


class When(Strict):
    """The trigger. Every part given must hold: age, patient, all, any (one of), none (absence).
    An item of all/any/none is a clause or a nested group (`any:`, `all:` or `none:` with its own items)."""

    age: AgeRange | None = None
    patient: FhirPath | None = Field(None, description="FHIRPath on the Patient resource; must be true")
    all: list[Item] = Field(default_factory=list, description="each item must hold")
    any: list[Item] = Field(default_factory=list, description="at least one item must hold")
    none: list[Item] = Field(default_factory=list, description="no item may hold (absence)")

    @model_validator(mode="after")
    def _has_trigger(self) -> When:
        if not (self.all or self.any or self.patient or self.age):
            raise ValueError("`when` needs at least one of all, any, patient or age")
        _picks_alike(self.any)
        return self


class Coding(Strict):
    system: str = Field(pattern=r"^[a-z][a-z0-9+.-]*:", description="absolute URI of the code system")
    code: str = Field(min_length=1)
    display: str = Field(min_length=1)


class OverrideCoding(Coding):
    """An override reason as a full Coding, optionally with its own lockout."""

    lockout: Duration | None = Field(None, description="after an override with this reason, no card about the same "
                                                       "focus for this long (default: the rule's `suppress`, else "
                                                       "the service's)")


def _reasons_kind(value: Any) -> str:
    return "ReasonLockouts" if isinstance(value, dict) else "ReasonList"


def _reason_kind(value: Any) -> str:
    return "ReasonCoding" if isinstance(value, dict | BaseModel) else "ReasonCode"


# Tagged unions, so a mistake is reported against the form it was written in, not against every form.
OverrideReason = Annotated[Annotated[str, Tag("ReasonCode")] | Annotated[OverrideCoding, Tag("ReasonCoding")],
                           Discriminator(_reason_kind)]
OverrideReasons = Annotated[
    Annotated[list[OverrideReason], Tag("ReasonList")]
    | Annotated[dict[str, Duration], Tag("ReasonLockouts")],
    Discriminator(_reasons_kind)]


class Action(Strict):
    type: Literal["create", "update", "delete"]
    description: str = Field(min_length=1)
    resource: dict[str, Any] | None = Field(
        None, description="a FHIR R4 resource; strings may use {{context.patientId}} and similar")
    resource_id: str | None = Field(None, description="Type/id to delete")

    @model_validator(mode="after")
    def _payload(self) -> Action:
        if self.type == "delete" and not self.resource_id:
            raise ValueError("a delete action needs resource_id")
        if self.type != "delete" and not self.resource:
            raise ValueError(f"a {self.type} action needs a resource")
        return self


class Suggestion(Strict):
    label: str = Field(min_length=1)
    recommended: bool = False
    actions: list[Action] = Field(default_factory=list)


class Link(Strict):
    label: str = Field(min_length=1)
    url: str = Field(pattern=r"^https?://", description="absolute URL")
    type: Literal["absolute", "smart"] = "absolute"
    app_context: str | None = Field(None, description="only for smart links")

    @model_validator(mode="after")
    def _app_context_for_smart_only(self) -> Link:
        if self.app_context and self.type != "smart":
            raise ValueError("app_context is only allowed on smart links")
        return self


class Escalation(Strict):
    """A card that grows more urgent as time passes: from `after` since the bound resource's date, the
    card shows `indicator` (the last entry whose time has come wins)."""

    after: Duration
    since: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="a name bound whenever the rule fires")
    indicator: Indicator


class Card(Strict):
    summary: str = Field(min_length=1, max_length=139,
                         description="< 140 characters; placeholders and {{#name}}/{{^name}} sections allowed")
    indicator: Indicator
    detail: str | None = Field(
        None, description="GitHub-flavoured markdown; placeholders and {{#name}}/{{^name}} sections allowed")
    selection: Literal["at-most-one", "any"] = "at-most-one"
    suggestions: list[Suggestion] = Field(default_factory=list)
    links: list[Link] = Field(default_factory=list)
    escalate: list[Escalation] = Field(
        default_factory=list, description="raise the indicator as time passes since a bound resource, e.g. "
                                          "warning, then critical from 12h after the first elevated troponin")
    override_reasons: OverrideReasons = Field(
        default_factory=list,
        description="codes of the HL7 non-adherence-reason-codes CodeSystem or full Codings (with an optional "
                    "`lockout`), or a mapping of HL7 codes to lockouts: {patient-refuses: 30d, "
                    "indication-order-exists: 7d}")


class Citation(Strict):
    """A `seeds/` passage (seed: record-id#p3) or a published reference (evidence id or full)."""

    seed: str | None = Field(None, pattern=r"^[a-z0-9-]+#p\d+$")
    evidence: str | None = Field(None, description="id of an entry in seeds/evidence.yaml")
    title: str | None = None
    publisher: str | None = None
    year: int | None = None
    doi: str | None = None
    url: str | None = Field(None, pattern=r"^https?://")

    @model_validator(mode="after")
    def _one_kind(self) -> Citation:
        if not (self.seed or self.evidence or (self.title and (self.doi or self.url))):
            raise ValueError("a citation needs `seed`, `evidence`, or a title with a doi or url")
        return self


Recipients = Literal["encounter-participants", "care-team", "pool"]
TARGET_NAME = r"^[a-z0-9]+([-_][a-z0-9]+)*$"


class Addressed(Strict):
    """Who a push is for: the participants of the encounter the event belongs to, the patient's care
    team, or a configured pool; `roles` narrows the first two, `pool` is the fallback when nobody is found."""

    roles: list[str] = Field(
        default_factory=list, description="only participants with these codes: Encounter.participant.type "
                                          "(v3 ParticipationType, e.g. ATND attender) or CareTeam.participant.role")
    pool: str | None = Field(None, pattern=TARGET_NAME,
                             description="a pool configured in delivery.pools: the recipient when `to`/`owner` is "
                                         "pool, otherwise the fallback when no participant is found")


class CommunicationDelivery(Addressed):
    """A FHIR Communication on the patient's FHIR server (the EHR's in-basket shows it)."""

    channel: Literal["communication"]
    to: Recipients


class TaskDelivery(Addressed):
    """A FHIR Task: work a person must do, with an owner and a due time."""

    channel: Literal["task"]
    owner: Recipients
    due: Duration | None = Field(None, description="Task.restriction.period.end, this long after the card fires")
    code: Coding | None = Field(None, description="Task.code: what is to be done")


class WebhookDelivery(Strict):
    """A signed CloudEvent (Standard Webhooks) to a configured endpoint: secure chat, paging."""

    channel: Literal["webhook"]
    endpoint: str = Field(pattern=TARGET_NAME, description="an endpoint configured in delivery.webhooks")


Delivery = Annotated[CommunicationDelivery | TaskDelivery | WebhookDelivery, Field(discriminator="channel")]


class Followup(Strict):
    """Between visits: when an event brings a resource matching the `all` clause bound as `start`,
    check the whole `when` again `after` later and raise the card if it then holds."""

    start: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="a name bound (`as`) by an `all` clause")
    after: Duration = Field(description="how long after the event to check again, e.g. 12h")
    deliver: list[Delivery] = Field(
        default_factory=list, description="where the card is pushed when it fires (it also waits for the "
                                          "patient's next hook call, until a push is acknowledged)")


class SourceAttributes(Strict):
    """ONC HTI-1-style source attributes of a decision support intervention, what a clinician or reviewer
    asks before trusting a nudge. In ruleset.yaml they are the defaults for every rule; a rule's own
    `source_attributes` replaces any of them. Known false positives are the rule's `falsepositives`."""

    developer: str | None = Field(default=None, min_length=1, description="who developed and maintains the rule")
    funding: str | None = Field(default=None, min_length=1, description="who funded its development")
    intended_use: str | None = Field(default=None, min_length=1,
                                     description="for whom, when and for what decision it is meant (and what not)")
    cautions: list[str] | None = Field(default=None, description="limitations and cautions for users")
    last_review: str | None = Field(default=None, pattern=r"^\d{4}-\d{2}-\d{2}$",
                                    description="when the rule and its evidence were last reviewed (YYYY-MM-DD)")


class Change(Strict):
    """One entry of a rule's history: what changed in a version and why (shown in the catalog)."""

    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    what: str = Field(min_length=1, description="what changed for clinicians, and why")


class Rule(Strict):
    """One nudge: when it fires, what card it shows, why, and on what evidence."""

    id: str = Field(pattern=ID_PATTERN, description="kebab-case; equals the file name without .yaml")
    title: str = Field(min_length=1)
    status: Status
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    hooks: list[Hook] = Field(min_length=1, json_schema_extra={"uniqueItems": True})
    topic: str = Field(pattern=ID_PATTERN, description="equity topic; shown as the card's source.topic")

    @field_validator("hooks")
    @classmethod
    def _hooks_once(cls, value: list[str]) -> list[str]:
        twice = sorted({h for h in value if value.count(h) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice: name each hook once")
        return value
    owner: str = Field(min_length=1)
    when: When
    card: Card
    rationale: str = Field(min_length=1, description="plain language: why this nudge exists")
    citations: list[Citation] = Field(min_length=1)
    falsepositives: list[str] = Field(min_length=1, description="known situations where it fires wrongly")
    suppress: Duration | None = Field(None, description="do not show again to the same patient for this long")
    followup: Followup | None = Field(
        None, description="check again after an event (FHIR notification) even if no hook is called")
    changes: list[Change] = Field(default_factory=list, description="the rule's history, newest first")
    race_correction_removal: bool = Field(
        False, description="only for rules that remove a race correction: allows reading race data")
    source_attributes: SourceAttributes | None = Field(
        None, description="HTI-1-style source attributes; unset ones come from ruleset.yaml")


class ValueSet(Strict):
    """A named code list (valuesets/<name>.yaml). FHIR R4 ValueSet JSON (valuesets/<name>.json, e.g. a
    VSAC/eCQM expansion exported unchanged) is read next to these; see rules/valuesets.py."""

    name: str = Field(pattern=ID_PATTERN, description="equals the file name; what rules name in `codes:`")
    title: str = Field(min_length=1)
    description: str | None = None
    source: str | None = Field(None, min_length=1, description="where the codes came from (a VSAC OID and expansion, "
                                                               "an RxNav query, a code system browser), so they can "
                                                               "be checked again")
    version: str | None = Field(None, min_length=1, description="this list's version (the source's, or your own)")
    date: str | None = Field(None, pattern=r"^\d{4}-\d{2}-\d{2}$",
                             description="when the codes were last checked (YYYY-MM-DD)")
    codes: list[Coding] = Field(min_length=1)

    @field_validator("date")
    @classmethod
    def _a_day(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"'{value}' is not a day of the calendar: write it as YYYY-MM-DD") from None
        return value


class SiteCodes(Strict):
    """A site's own codes for a shipped value set (site_valuesets/<name>.yaml): local orderables such as a
    "Security - room search" order code, added to the set of the same name without editing the rules."""

    name: str = Field(pattern=ID_PATTERN, description="the shipped value set these codes join")
    description: str | None = None
    source: str = Field(min_length=1, description="e.g. the site's order catalog and its export date")
    codes: list[Coding] = Field(min_length=1)


class CaseExpectation(Strict):
    """Fields the card must have; absent fields are not checked."""

    indicator: Indicator | None = None
    summary: str | None = None
    summary_contains: str | None = None
    detail_contains: str | None = None
    suggestions: list[str] | None = Field(None, description="suggestion labels, in order")


class Case(Strict):
    name: str = Field(min_length=1)
    hook: Hook
    now: str | None = Field(None, description="ISO 8601 instant; defaults to the file's `now`")

    @field_validator("now")
    @classmethod
    def _instant(cls, value: str | None) -> str | None:
        return _checked_instant(value)

    bundle: str | None = Field(None, description="path of a FHIR Bundle (relative to this file or a parent)")
    resources: list[dict[str, Any]] = Field(default_factory=list, description="inline FHIR resources")
    draft_orders: list[dict[str, Any]] = Field(default_factory=list)
    selections: list[str] = Field(default_factory=list)
    appointments: list[dict[str, Any]] = Field(default_factory=list)
    context: dict[str, Any] = Field(default_factory=dict, description="extra hook context fields")
    expect: list[CaseExpectation] = Field(
        max_length=1, description="the card this rule must return ([] means it must not fire); a rule raises "
                                  "at most one card per call, so the list holds at most one")


class Cases(Strict):
    rule: str = Field(pattern=ID_PATTERN)
    now: str = Field(description="ISO 8601 instant every case runs at, unless it sets its own")
    cases: list[Case] = Field(min_length=1)

    @field_validator("now")
    @classmethod
    def _instant(cls, value: str) -> str:
        checked = _checked_instant(value)
        assert checked is not None
        return checked


def _checked_instant(value: str | None) -> str | None:
    """A case's clock must parse where lint can say so (it had failed every case at run time instead)."""
    if value is None:
        return None
    try:
        datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"'{value}' is not an ISO 8601 instant: write it as 2026-03-02T12:00:00Z") from None
    return value


class RuleSetManifest(Strict):
    """rules/ruleset.yaml: what the whole set is called and its semantic version."""

    name: str
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    source_label: str = Field(description="card source.label")
    topic_system: str = Field(pattern=r"^[a-z][a-z0-9+.-]*:", description="Coding system of source.topic")
    topics: dict[str, str] = Field(description="topic code -> display")
    seeds: str = Field("../seeds", description="folder of source passages that `seed:` citations are checked "
                                               "against, relative to this file")
    fixtures: list[str] = Field(default_factory=lambda: ["../fhir_fixtures"],
                                description="folders where cases' `bundle:` paths are also looked up, relative to "
                                            "this file (after the cases file's own folder and its parents)")
    source_attributes: SourceAttributes = Field(
        default_factory=lambda: SourceAttributes(),
        description="HTI-1-style source attributes every rule has unless it gives its own (developer, funding, ...)")


def json_schema() -> dict[str, Any]:
    """Schema for rule files; cases and value sets are exported alongside under $defs."""
    schema = Rule.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "nudges rule"
    return schema


SCHEMAS: dict[str, type[BaseModel]] = {"rule": Rule, "cases": Cases, "valueset": ValueSet, "sitecodes": SiteCodes,
                                       "ruleset": RuleSetManifest}
