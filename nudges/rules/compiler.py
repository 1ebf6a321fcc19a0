"""Load a rules directory, check it, and compile it once into plain dataclasses for the engine.

A set with any problem is refused as a whole: the service keeps the last good set.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

from ..fhir import CODE_ELEMENTS
from . import yamlfiles
from .compiled import CardTemplate, CompiledClause, CompiledGroup, CompiledItem, CompiledRule, RuleSet
from .delivery import Targets, compile_deliveries
from .elements import type_names
from .fastpath.memo import memo_for
from .fhirpath import MEMBER_OF, RACE_READ, Compiled, FhirPathSyntaxError, compile_expression, shared_text
from .folders import (
    bare_minutes,
    case_names,
    check_cases,
    missing_folders,
    placeholders,
    scaffold_left,
    seed_passages,
)
from .folders import display as _show
from .resources import did_you_mean
from .schema import (
    Card,
    Cases,
    Clause,
    Group,
    OverrideCoding,
    Rule,
    RuleSetManifest,
    alternatives,
    parse_duration,
)
from .templates import PLACEHOLDER, SAMPLE, known_placeholder, template_problems
from .valuefiles import load_valuesets
from .valuesets import NON_ADHERENCE, REASON_SYSTEM, REMIND_LATER_CODE, CompiledValueSet, override_coding
from .yamlfiles import Problem


@dataclass
class Steps:
    """Counts a load's steps for a progress callback (none when nobody listens)."""

    listener: Callable[[int, int], None] | None
    total: int
    done: int = 0

    def advance(self) -> None:
        self.done += 1
        if self.listener is not None:
            self.listener(self.done, self.total)


@dataclass
class LoadResult:
    ruleset: RuleSet | None
    problems: list[Problem]
    files: int = 0
    warnings: list[Problem] = field(default_factory=list)  # worth fixing, but the set still loads
    unconfigured: list[Problem] = field(default_factory=list)  # deliveries naming what the site has not set up


def rule_files(directory: Path, site: Path | None = None) -> list[Path]:
    """Every file a rule set is made of (what its digest covers and hot reload watches)."""
    files = [p for p in directory.rglob("*.yaml") if p.is_file()]
    files += [p for p in directory.rglob("*.json") if p.is_file() and p.parent.name == "valuesets"]
    if site is not None and site.is_dir():
        files += [p for p in site.iterdir() if p.is_file() and p.suffix in (".yaml", ".json")]
    return sorted(files)


def load_ruleset(directory: Path, site: Path | None = None, targets: Targets | None = None,
                 progress: Callable[[int, int], None] | None = None) -> LoadResult:
    """Load, check and compile a rules directory (and a site's own value-set codes, `site_valuesets`).
    With `targets` (the pools and webhook endpoints a site configures) follow-up deliveries are checked
    against them too; `progress(done, total)` hears each file parsed, rule compiled and cases file checked."""
    directory = directory.resolve()
    site = site.resolve() if site is not None else None
    problems: list[Problem] = []
    files = rule_files(directory, site)
    if not any(p.suffix == ".yaml" and p.is_relative_to(directory) for p in files):
        return LoadResult(None, [Problem(str(directory), 1, 1, "no rule files found")])
    if site is not None and not site.is_dir():
        problems.append(Problem(str(site), 1, 1, "site_valuesets is not a folder"))

    digest = hashlib.sha256()
    for path in files:
        label = path.relative_to(directory) if path.is_relative_to(directory) else Path("site") / path.name
        digest.update(str(label).encode() + b"\0" + path.read_bytes() + b"\0")

    manifest_path = directory / "ruleset.yaml"
    manifest: RuleSetManifest | None = None
    manifest_doc: yamlfiles.Document | None = None
    if manifest_path.exists():
        manifest_doc, found = yamlfiles.load(manifest_path, _show(manifest_path))
        problems += found
        if manifest_doc is not None:
            manifest, found = yamlfiles.validate(RuleSetManifest, manifest_doc, _show(manifest_path))
            problems += found
    else:
        problems.append(Problem(_show(directory), 1, 1, "missing ruleset.yaml (name, version, topics)"))

    site_files = [p for p in files if site is not None and p.parent == site]
    valuesets, found, unsourced = load_valuesets([p for p in files if p.parent.name == "valuesets"], site_files)
    problems += found
    broken = {p.stem for p in files if p.parent.name == "valuesets"} - set(valuesets)  # their own problems come first
    rule_docs: list[tuple[Path, yamlfiles.Document, Rule]] = []
    case_docs: dict[str, tuple[Path, yamlfiles.Document, Cases]] = {}
    # every file is parsed, then each rule compiled and each cases file checked: two steps for those
    documents = [p for p in files if p != manifest_path and p.parent.name != "valuesets" and p not in site_files]
    unread_rules: set[str] = set()  # file stems of rule and cases files refused before they said their rule
    unread_cases: set[str] = set()
    steps = Steps(progress, len(files) + len(documents))
    for path in files:
        steps.advance()
        if path == manifest_path or path.parent.name == "valuesets" or path in site_files:
            continue
        document, found = yamlfiles.load(path, _show(path))
        problems += found
        is_cases = path.name.endswith(".cases.yaml")
        if document is not None and is_cases:
            cases, found = yamlfiles.validate(Cases, document, _show(path))
            problems += found
            if cases is not None:
                case_docs[cases.rule] = (path, document, cases)
                continue
        elif document is not None:
            rule, found = yamlfiles.validate(Rule, document, _show(path))
            problems += found
            if rule is not None:
                rule_docs.append((path, document, rule))
                continue
        # refused, and said so: what depends on it is not reported again as missing
        (unread_cases if is_cases else unread_rules).add(path.name.removesuffix(".cases.yaml").removesuffix(".yaml"))

    seeds_dir = (manifest_path.parent / (manifest.seeds if manifest else "../seeds")).resolve()
    fixture_dirs = tuple((manifest_path.parent / f).resolve() for f in (manifest.fixtures if manifest else ()))
    seeds = seed_passages(seeds_dir)
    compiled: list[CompiledRule] = []
    unconfigured: list[Problem] = []
    seen_ids: dict[str, str] = {}
    unchecked: list[str] = []  # rules whose `seed:` citations cannot be checked (no seeds folder)
    for path, document, rule in rule_docs:
        steps.advance()
        checker = _RuleChecker(_show(path), document, rule, valuesets, manifest, seeds, seeds_dir, broken,
                               targets)
        result = checker.compile()
        problems += checker.problems
        unconfigured += checker.warnings
        if checker.unchecked_seeds:
            unchecked.append(rule.id)
        if rule.id in seen_ids:
            problems.append(Problem(_show(path), *yamlfiles.position(document, ("id",)),
                                    f"duplicate rule id (also in {seen_ids[rule.id]})"))
        seen_ids[rule.id] = _show(path)
        if path.stem != rule.id:
            problems.append(Problem(_show(path), *yamlfiles.position(document, ("id",)),
                                    f"rule id '{rule.id}' must equal the file name '{path.stem}'"))
        cases_entry = case_docs.get(rule.id)
        if cases_entry is not None and cases_entry[0].parent != path.parent:
            problems.append(Problem(_show(cases_entry[0]), 1, 1, "cases must sit beside their rule file"))
        served = []  # the cases on a hook the rule is served on: the others test a call that never reaches it
        if cases_entry is not None:
            cases_path, cases_doc, rule_cases = cases_entry
            for i, case in enumerate(rule_cases.cases):
                if case.hook in rule.hooks:
                    served.append(case)
                    continue
                problems.append(Problem(_show(cases_path), *yamlfiles.position(cases_doc, ("cases", i, "hook"),
                                                                               value=True),
                                        f"case '{case.name}' calls {case.hook}, a hook {rule.id} is not served on "
                                        f"(hooks: {', '.join(rule.hooks)}): use one of those"))
            problems += case_names(cases_path, cases_doc, rule_cases)
        if rule.status == "active":
            firing = any(c.expect for c in served)
            quiet = any(not c.expect for c in served)
            if not (firing and quiet) and rule.id not in unread_cases:
                problems.append(Problem(_show(path), *yamlfiles.position(document, ("status",)),
                                        "an active rule needs at least one firing and one non-firing case "
                                        f"in {rule.id}.cases.yaml"))
        if result is not None:
            compiled.append(result)
            if rule.status == "active":
                problems += scaffold_left(result, _show(path), document, case_docs.get(rule.id))
        unsourced += bare_minutes(_show(path), document.text)
        left = placeholders(document.text)
        if left is not None:
            line, col, count = left
            if rule.status == "active":
                problems.append(Problem(_show(path), line, col, f"an active rule keeps {count} placeholder(s) from "
                                        "`nudges new rule` (REPLACE, replace-me): fill them in first"))
            else:
                unsourced.append(Problem(_show(path), line, col, f"{count} placeholder(s) from `nudges new rule` "
                                         "left to fill in (REPLACE, replace-me); this is the first"))
    warnings = [*unsourced, *unconfigured]
    for rule_id, (path, document, cases) in case_docs.items():
        steps.advance()
        if rule_id not in seen_ids and rule_id in unread_rules:
            continue  # its rule file was refused: that is the problem to fix, not these cases
        if rule_id not in seen_ids:  # a retired rule's cases: harmless, but worth deleting
            warnings.append(Problem(_show(path), *yamlfiles.position(document, ("rule",)),
                                    f"cases for '{rule_id}', which no rule file defines (retired? delete this "
                                    "file, or restore the rule)"))
            continue
        problems += check_cases(path, document, cases, fixture_dirs)
    if steps.done < steps.total:  # documents that did not parse have no second step
        steps.done = steps.total - 1
        steps.advance()
    problems += missing_folders(manifest_path, manifest_doc, seeds_dir, unchecked, fixture_dirs, problems)

    if problems or manifest is None:
        return LoadResult(None, sorted(set(problems)), len(files), sorted(warnings))
    ruleset = RuleSet(manifest, digest.hexdigest(), tuple(sorted(compiled, key=lambda r: r.id)),
                      {rule_id: (path, cases) for rule_id, (path, _, cases) in case_docs.items()
                       if rule_id in seen_ids},
                      directory, valuesets, fixture_dirs, seeds_dir if seeds is not None else None)
    return LoadResult(ruleset, [], len(files), sorted(warnings), sorted(unconfigured))


class _RuleChecker:
    """Semantic checks that need more than the schema, and compilation into CompiledRule."""

    def __init__(self, display: str, data: yamlfiles.Document, rule: Rule, valuesets: dict[str, CompiledValueSet],
                 manifest: RuleSetManifest | None, seeds: dict[str, set[str]] | None, seeds_dir: Path,
                 broken: set[str] | None = None, targets: Targets | None = None) -> None:
        self.display, self.data, self.rule, self.broken = display, data, rule, broken or set()
        self.targets = targets
        self.failed_quietly = False  # a knock-on of a problem reported elsewhere: compile nothing, say nothing
        self.valuesets, self.manifest, self.seeds, self.seeds_dir = valuesets, manifest, seeds, seeds_dir
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []  # the rule still loads (a delivery name the site has not configured)
        self.unchecked_seeds = 0
        self.value_set_keys = {name: vs.keys for name, vs in valuesets.items()}  # what memberOf tests

    def problem(self, loc: tuple[Any, ...], message: str, *, value: bool = False, offset: int = 0) -> None:
        line, col = yamlfiles.position(self.data, loc, value=value, offset=offset)
        self.problems.append(Problem(self.display, line, col, message))

    def expression(self, loc: tuple[Any, ...], text: str | None, resource: str | None,
                   bound: Mapping[str, str] | None = None) -> Compiled | None:
        if text is None:
            return None
        if RACE_READ.search(text) and not self.rule.race_correction_removal:
            self.problem(loc, "the trigger reads race or ethnicity: nudges must be universal "
                              "(only rules with race_correction_removal: true may)", value=True)
        for name in MEMBER_OF.findall(text):
            vs = self.valuesets.get(name[0])
            if vs is not None and vs.reads_race() and not self.rule.race_correction_removal:
                self.problem(loc, f"memberOf('{name[0]}'): value set holds race/ethnicity codes: triggers "
                                  "must be universal", value=True)
        try:
            return compile_expression(text, resource, self.value_set_keys, bound or {})
        except FhirPathSyntaxError as exc:
            quoted = 1 if yamlfiles.is_quoted(yamlfiles.node_at(self.data, loc)) else 0
            self.problem(loc, str(exc), value=True, offset=exc.column + quoted)
            return None

    def items(self, loc: tuple[Any, ...], items: list[Clause | Group], names: _Names, *, certain: bool,
              negated: bool = False, any_of: bool = False, all_of: bool = False) -> tuple[CompiledItem, ...]:
        """Compile clauses and groups in evaluation order. A name bound under any (the rule may fire without
        it) anchors a later `since` but not card text, unless each item binds it (schema.alternatives).
        Under `none`, a name bound in an `all` group anchors the later items of that group only ("the
        latest housing status is a nursing home": one answer, and none since it that says otherwise): the
        engine drops what a negated item bound once it has been tried."""
        compiled: list[CompiledItem] = []
        shared = alternatives(items) if any_of and not negated else None
        for i, item in enumerate(items):
            at = (*loc, i)
            if isinstance(item, Group):
                inner_negated = negated or item.mode == "none"
                before = set(names.seen) if inner_negated else set()
                inner = self.items((*at, item.mode), item.items, names, certain=certain and item.mode == "all",
                                   negated=inner_negated, any_of=item.mode == "any", all_of=item.mode == "all")
                if inner_negated:  # names bound inside are out of scope past the group
                    for name in set(names.seen) - before:
                        del names.seen[name]
                if len(inner) == len(item.items):
                    compiled.append(CompiledGroup(item.mode, inner))
                    if certain and item.mode == "any" and (shared_here := alternatives(item.items)):
                        names.certain.add(shared_here)  # bound whichever branch held
                continue
            if item.bind:
                if negated and not all_of:
                    self.problem((*at, "as"), "a clause under `none` matches nothing when the rule fires, so "
                                              "it cannot bind a name (except for the later items of an `all` "
                                              "group under it)", value=True)
                elif item.bind in names.seen and not (i and item.bind == shared):
                    self.problem((*at, "as"), f"'{item.bind}' is already bound by another clause", value=True)
            clause = self.clause(at, item, names.seen)
            if item.bind and (not negated or all_of):
                alternative = i and item.bind == shared and names.seen.get(item.bind) != item.resource
                names.seen[item.bind] = f"{names.seen[item.bind]}|{item.resource}" if alternative else item.resource
                if certain:  # never under `none`: it is compiled with certain=False
                    names.certain.add(item.bind)
            if clause is not None:
                compiled.append(clause)
        return tuple(compiled)

    def clause(self, loc: tuple[Any, ...], clause: Clause, bound: Mapping[str, str]) -> CompiledClause | None:
        from fhir.resources.R4B import get_fhir_model_class

        try:
            get_fhir_model_class(clause.resource)
            known_type = True
        except (ValueError, KeyError):
            known_type = False
            self.problem((*loc, "resource"), f"'{clause.resource}' is not a FHIR R4 resource type"
                         f"{did_you_mean(clause.resource, type_names())}", value=True)
        if clause.pick != "latest" and not clause.bind:
            self.problem((*loc, "pick"), "`pick` chooses which match a name binds: give the clause `as:` too",
                         value=True)
        codes = displays = None
        if clause.codes is not None:
            vs = self.valuesets.get(clause.codes)
            if vs is None:
                if clause.codes in self.broken:  # the value set's own file has problems, reported there
                    self.failed_quietly = True
                else:
                    self.problem((*loc, "codes"), f"unknown value set '{clause.codes}'"
                                                  f"{did_you_mean(clause.codes, set(self.valuesets))}", value=True)
            else:
                if vs.reads_race() and not self.rule.race_correction_removal:
                    self.problem((*loc, "codes"), "value set holds race/ethnicity codes: triggers must be "
                                                  "universal", value=True)
                codes, displays = vs.keys, vs.displays
            if known_type and not CODE_ELEMENTS.get(clause.resource):  # (an unknown type is said once, above)
                self.problem((*loc, "codes"), f"{clause.resource} has no indexed code element: "
                                              "match it with `where` instead", value=True)
        if clause.since is not None and clause.since not in bound:
            self.problem((*loc, "since"), f"'{clause.since}' is not bound by a clause evaluated before this "
                                          "one (all, then any, then none; in file order)", value=True)
        text = None
        if clause.text is not None:
            if RACE_READ.search(clause.text) and not self.rule.race_correction_removal:
                self.problem((*loc, "text"), "the trigger reads race or ethnicity: nudges must be universal",
                             value=True)
            try:
                text = re.compile(clause.text, re.IGNORECASE)
            except re.error as exc:
                self.problem((*loc, "text"), f"bad regular expression: {exc}", value=True)
        where = self.expression((*loc, "where"), clause.where, clause.resource, bound)
        date = self.expression((*loc, "date"), clause.date, clause.resource, bound)
        sources = {"any": ("record", "draft")}.get(clause.source, (clause.source,))
        if not clause.required and (clause.resource == "Patient" or "record" not in sources):
            self.problem((*loc, "required"), "`required: false` is for what is read from the record's other "
                                             "resources (the Patient is always asked for; drafts and selections "
                                             "come with the call): remove it", value=True)
        within, older_than = (parse_duration(value) if value else None for value in (clause.within, clause.older_than))
        settled = shared_text(clause.where, where)
        return CompiledClause(
            clause.bind, clause.resource, codes, displays or {}, where, text, within, older_than, clause.since,
            date, sources, clause.pick == "earliest", settled, shared_text(clause.date, date), memo_for(settled, where),
            clause.required)

    def card(self, card: Card, names: _Names) -> CardTemplate | None:
        ok, bound = True, names.certain
        texts = [(("card", "summary"), card.summary), (("card", "detail"), card.detail or "")]
        suggestions_json = None
        if card.suggestions:
            payload = []
            for i, s in enumerate(card.suggestions):
                actions = []
                for j, action in enumerate(s.actions):
                    if action.resource is not None:
                        ok &= self._valid_resource(("card", "suggestions", i, "actions", j, "resource"),
                                                   action.resource, bound)
                    entry: dict[str, Any] = {"type": action.type, "description": action.description}
                    if action.resource is not None:
                        entry["resource"] = yamlfiles.plain(action.resource)
                    if action.resource_id:
                        entry["resourceId"] = action.resource_id
                    actions.append(entry)
                item: dict[str, Any] = {"label": s.label}
                if s.recommended:
                    item["isRecommended"] = True
                if actions:
                    item["actions"] = actions
                payload.append(item)
            suggestions_json = orjson.dumps(payload)
        for loc, text in texts:
            for message in template_problems(text, bound, names.seen):
                self.problem(loc, message, value=True)
                ok = False
        reasons, lockouts = self.override_reasons(card)
        ok &= reasons is not None
        links = tuple({k: v for k, v in (("label", link.label), ("url", link.url), ("type", link.type),
                                         ("appContext", link.app_context)) if v} for link in card.links)
        escalate = []
        for i, step in enumerate(card.escalate):
            if step.since not in bound:
                self.problem(("card", "escalate", i, "since"), f"'{step.since}' is not a name bound whenever the rule "
                             f"fires (bound under `all`: {', '.join(sorted(bound)) or 'none'})", value=True)
                ok = False
            escalate.append((parse_duration(step.after), step.since, step.indicator))
        if [e[0] for e in escalate] != sorted(e[0] for e in escalate):
            self.problem(("card", "escalate"), "list escalation steps from the soonest to the latest")
            ok = False
        if not ok:
            return None
        return CardTemplate(card.summary, card.indicator, card.detail.strip() if card.detail else None,
                            card.selection, suggestions_json, links, tuple(reasons or ()), tuple(escalate),
                            lockouts)

    def override_reasons(self, card: Card) -> tuple[list[dict[str, str]] | None, tuple[timedelta | None, ...]]:
        """The card's override reasons as Codings with their own lockouts (list or mapping form); None when
        one is not a code the card can offer (durations were checked by the schema)."""
        given = card.override_reasons
        items = list(given.items()) if isinstance(given, dict) else [(r, None) for r in given]
        reasons, lockouts, ok = [], [], True
        for i, (reason, lockout) in enumerate(items):
            at = ("card", "override_reasons", reason if isinstance(given, dict) else i)
            if isinstance(reason, str) and reason not in NON_ADHERENCE:
                mapping = " (a mapping's keys are HL7 codes: list full Codings with `lockout:` for others)" \
                    if isinstance(given, dict) else ""
                self.problem(at, f"'{reason}' is not an HL7 non-adherence reason code; give a full Coding "
                                 f"instead{mapping}{did_you_mean(reason, set(NON_ADHERENCE))}")
                ok = False
                continue
            coding = override_coding(reason)
            if (coding["system"], coding["code"]) == (REASON_SYSTEM, REMIND_LATER_CODE):
                self.problem(at, "'remind-me-later' is the service's own snooze, offered on every card with "
                                 "override reasons: leave it out")
                ok = False
                continue
            if isinstance(reason, OverrideCoding) and reason.lockout:
                lockout = reason.lockout
            reasons.append(coding)
            lockouts.append(parse_duration(lockout) if lockout else None)
        return (reasons if ok else None), tuple(lockouts)

    def _valid_resource(self, loc: tuple[Any, ...], resource: dict[str, Any], bound: set[str]) -> bool:
        from .resources import check

        text = orjson.dumps(yamlfiles.plain(resource)).decode()
        for name in PLACEHOLDER.findall(text):
            if not known_placeholder(name, bound):
                self.problem(loc, f"unknown placeholder '{{{{{name}}}}}'")
                return False
        sample = PLACEHOLDER.sub(lambda m: SAMPLE.get(m.group(1), "example"), text)
        found = check(orjson.loads(sample))  # structure, then the codes of required bindings (intent: proposl)
        if found:
            self.problem((*loc, *found[0].location), f"suggestion resource is not valid FHIR R4: {found[0].message}")
            return False
        return True

    def compile(self) -> CompiledRule | None:
        rule = self.rule
        before = len(self.problems)
        if self.manifest is not None and rule.topic not in self.manifest.topics:
            self.problem(("topic",), f"topic '{rule.topic}' is not listed in ruleset.yaml topics"
                         f"{did_you_mean(rule.topic, set(self.manifest.topics))}", value=True)
        for i, citation in enumerate(rule.citations):
            if not citation.seed:
                continue
            if self.seeds is None:  # never silently unchecked: reported once, at ruleset.yaml (_missing_folders)
                self.unchecked_seeds += 1
                continue
            record, passage = citation.seed.split("#")
            if record not in self.seeds:
                self.problem(("citations", i, "seed"), f"no seed record '{record}' in {self.seeds_dir}"
                                                       f"{did_you_mean(record, set(self.seeds))}", value=True)
            elif passage not in self.seeds[record]:
                self.problem(("citations", i, "seed"), f"no passage '{passage}' in seed '{record}' (it has "
                                                       f"{', '.join(sorted(self.seeds[record])) or 'none'})",
                             value=True)
        names = _Names()
        all_items = self.items(("when", "all"), rule.when.all, names, certain=True)
        any_items = self.items(("when", "any"), rule.when.any, names, certain=False, any_of=True)
        if (shared := alternatives(rule.when.any)) and len(any_items) == len(rule.when.any):
            names.certain.add(shared)  # the top-level `any` holds whenever the rule fires
        none_items = self.items(("when", "none"), rule.when.none, names, certain=False, negated=True)
        patient = self.expression(("when", "patient"), rule.when.patient, "Patient")
        top = {c.bind for c in rule.when.all if isinstance(c, Clause) and c.bind}
        if rule.followup is not None and rule.followup.start not in top:
            self.problem(("followup", "start"), f"'{rule.followup.start}' is not bound by a clause directly "
                                                "under `all`", value=True)
        delivery_problems, delivery_warnings, deliver = compile_deliveries(rule, self.targets)
        for loc, message in delivery_problems:
            self.problem(loc, message, value=True)
        for loc, message in delivery_warnings:
            self.warnings.append(Problem(self.display, *yamlfiles.position(self.data, loc, value=True), message))
        card = self.card(rule.card, names)
        if len(self.problems) > before or card is None or self.failed_quietly:
            return None
        age = rule.when.age
        source_url = next((c.url or (f"https://doi.org/{c.doi}" if c.doi else None)
                           for c in rule.citations if c.url or c.doi), None)
        return CompiledRule(
            rule.id, rule.title, rule.status, rule.version, frozenset(rule.hooks), rule.topic,
            age.min if age else None, age.max if age else None, patient,
            all_items, any_items, none_items, card,
            parse_duration(rule.suppress) if rule.suppress else None, source_url, self.display, rule,
            followup_start=rule.followup.start if rule.followup else None,
            followup_after=parse_duration(rule.followup.after) if rule.followup else None, deliver=deliver)


@dataclass
class _Names:
    seen: dict[str, str] = field(default_factory=dict)  # bound by some clause evaluated earlier -> its type
    certain: set[str] = field(default_factory=set)  # bound whenever the rule fires
