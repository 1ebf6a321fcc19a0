"""Nested groups in `when` ("A and (B or C)", "not (X and Y)") and `since` on names bound under any."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from helpers import troponin

from nudges.cli import main
from nudges.clock import parse_instant
from nudges.engine import evaluate
from nudges.record import PatientRecord
from nudges.rules.compiled import CompiledGroup
from nudges.rules.compiler import load_ruleset
from nudges.services import Services

RULE = Path("cardiology/troponin-without-cath-plan.yaml")
NOW = parse_instant("2026-03-02T12:00:00Z")
FLAT_NONE = """  none:
    - resource: ServiceRequest
      codes: cardiac-catheterization-or-cardiology
      since: troponin
    - resource: Procedure
      codes: cardiac-catheterization-or-cardiology
      since: troponin
"""
NESTED = """    - any:
        - resource: Condition
          text: chest pain
        - as: visit
          resource: Encounter
          text: chest pain
  none:
    - all:
        - resource: ServiceRequest
          codes: cardiac-catheterization-or-cardiology
          since: troponin
        - resource: Procedure
          codes: cardiac-catheterization-or-cardiology
          since: troponin
"""
CATH = {"coding": [{"system": "http://snomed.info/sct", "code": "41976001"}]}
PAIN = {"resourceType": "Condition", "id": "c1", "code": {"text": "Chest pain, unspecified"}}
ORDER = {"resourceType": "ServiceRequest", "id": "s1", "status": "active", "authoredOn": "2026-03-02T08:00:00Z",
         "code": CATH}  # a cath order after the troponin of helpers.troponin() ...
DONE = {"resourceType": "Procedure", "id": "p1", "status": "completed", "performedDateTime": "2026-03-02T09:00:00Z",
        "code": CATH}  # ... and the procedure an hour after the order


def lint(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["lint", str(rules_dir)])
    return code, capsys.readouterr().out.splitlines()


def nest(rules_dir: Path, replacement: str = NESTED) -> Path:
    path = rules_dir / RULE
    text = path.read_text()
    assert FLAT_NONE in text
    path.write_text(text.replace(FLAT_NONE, replacement))
    return path


def fired(rules_dir: Path, *resources: dict[str, Any]) -> bool:
    ruleset = load_ruleset(rules_dir).ruleset
    assert ruleset is not None
    service = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"]
    record = PatientRecord(service.index)
    record.add_all(resources)
    outcome = evaluate(service.rules, record, NOW)
    assert outcome.failed == []
    return "troponin-without-cath-plan" in [m.rule.id for m in outcome.matches]


def test_a_cath_code_is_in_the_test_value_set(rules_dir: Path) -> None:
    text = (rules_dir / "valuesets/cardiac-catheterization-or-cardiology.yaml").read_text()
    assert "41976001" in text


def test_and_of_or_and_not_of_and(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nest(rules_dir)
    code, out = lint(rules_dir, capsys)
    assert code == 0, out
    pain, order, done = (copy.deepcopy(r) for r in (PAIN, ORDER, DONE))  # the engine may canonicalize in place
    assert fired(rules_dir, troponin(), pain)
    assert not fired(rules_dir, troponin())  # the any-group holds for neither
    assert fired(rules_dir, troponin(), pain, order)  # not (order and procedure): one is not both
    assert not fired(rules_dir, troponin(), pain, order, done)
    visit = {"resourceType": "Encounter", "id": "e1", "status": "in-progress",
             "period": {"start": "2026-03-02T07:00:00Z"}, "reasonCode": [{"text": "chest pain"}]}
    assert fired(rules_dir, troponin(), visit)


def test_nested_clauses_reach_prefetch_and_the_index(rules_dir: Path) -> None:
    nest(rules_dir)
    ruleset = load_ruleset(rules_dir).ruleset
    assert ruleset is not None
    rule = next(r for r in ruleset.rules if r.id == "troponin-without-cath-plan")
    assert isinstance(rule.none[0], CompiledGroup) and rule.none[0].mode == "all"
    assert [c.resource for c in rule.clauses()] == ["Observation", "Condition", "Encounter", "ServiceRequest",
                                                     "Procedure"]
    service = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"]
    templates = " ".join(service.plan.templates.values())
    assert "Condition?patient=" in templates and "Encounter?patient=" in templates


SCOPED = """    - any:
        - resource: Condition
          text: chest pain
  none:
    - all:
        - as: order
          resource: ServiceRequest
          codes: cardiac-catheterization-or-cardiology
          since: troponin
        - resource: Procedure
          codes: cardiac-catheterization-or-cardiology
          since: order
"""


def test_a_name_bound_under_none_anchors_the_rest_of_its_group(rules_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """not (an order after the troponin, and a procedure after that order): the name is the group's own."""
    path = nest(rules_dir, SCOPED)
    code, out = lint(rules_dir, capsys)
    assert code == 0, out
    pain, order, done = (copy.deepcopy(r) for r in (PAIN, ORDER, DONE))  # the engine may canonicalize in place
    early = dict(done, id="p0", performedDateTime="2026-03-02T07:00:00Z")  # after the troponin, before the order
    assert not fired(rules_dir, troponin(), pain, order, done)
    assert fired(rules_dir, troponin(), pain, order, early)
    assert fired(rules_dir, troponin(), pain, done)
    # Out of scope past the group: neither a later `none` item nor the card can use it.
    text = path.read_text()
    path.write_text(text.replace("          since: order\n", "          since: order\n"
                                 "    - resource: Flag\n      since: order\n"))
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any("'order' is not bound by a clause evaluated before" in line for line in out), out
    path.write_text(text.replace("ago with no catheterization", "ago ({{order.date}}) with no cath"))
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any("order.date" in line for line in out), out


def test_since_may_follow_a_name_bound_under_any(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nest(rules_dir, """    - any:
        - as: visit
          resource: Encounter
          text: chest pain
        - resource: Condition
          text: chest pain
  none:
    - resource: ServiceRequest
      codes: cardiac-catheterization-or-cardiology
      since: visit
""")
    code, out = lint(rules_dir, capsys)
    assert code == 0, out
    visit = {"resourceType": "Encounter", "id": "e1", "status": "in-progress",
             "period": {"start": "2026-03-02T07:00:00Z"}, "reasonCode": [{"text": "chest pain"}]}
    before = {"resourceType": "ServiceRequest", "id": "s0", "status": "active",
              "authoredOn": "2026-03-02T06:00:00Z", "code": CATH}
    after = {"resourceType": "ServiceRequest", "id": "s1", "status": "active",
             "authoredOn": "2026-03-02T08:00:00Z", "code": CATH}
    assert fired(rules_dir, troponin(), visit, before)  # ordered before the visit: not a plan for it
    assert not fired(rules_dir, troponin(), visit, after)


ALTERNATIVES = """    - any:
        - as: pain
          resource: Condition
          text: chest pain
        - as: pain
          resource: Encounter
          text: chest pain
  none:
    - resource: ServiceRequest
      codes: cardiac-catheterization-or-cardiology
      since: pain
"""


def test_the_branches_of_an_any_may_bind_one_name_the_later_match_wins(rules_dir: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """One fact recorded two ways (here chest pain on the problem list or as the visit's reason): each
    branch binds `pain`, so card text may use it outside a section, and `since: pain` counts from the
    later of the two when both match."""
    path = nest(rules_dir, ALTERNATIVES)
    text = path.read_text()
    path.write_text(text.replace("ago with no catheterization", "ago (chest pain {{pain.date}}) with no cath"))
    code, out = lint(rules_dir, capsys)
    assert code == 0, out
    problem = {"resourceType": "Condition", "id": "c1", "code": {"text": "Chest pain"},
               "recordedDate": "2026-03-02T05:00:00Z"}
    visit = {"resourceType": "Encounter", "id": "e1", "status": "in-progress",
             "period": {"start": "2026-03-02T07:00:00Z"}, "reasonCode": [{"text": "chest pain"}]}
    order = {"resourceType": "ServiceRequest", "id": "s1", "status": "active", "authoredOn": "2026-03-02T06:00:00Z",
             "code": CATH}
    assert fired(rules_dir, troponin(), problem) and fired(rules_dir, troponin(), visit)
    assert not fired(rules_dir, troponin(), problem, order)  # ordered after the problem was recorded
    assert fired(rules_dir, troponin(), problem, visit, order)  # the visit is later: ordered before it
    assert fired(rules_dir, troponin(), visit, problem, order)  # whichever order the record holds them in
    # Its elements are checked as each type it may be: an Encounter's period is one, `statsu` neither's.
    for element, ok in (("period", True), ("statsu", False)):
        path.write_text(path.read_text().replace("      since: pain\n", f"      since: pain\n      where: "
                                                 f"\"%pain.{element}.exists() or status = 'active'\"\n", 1))
        code, out = lint(rules_dir, capsys)
        assert code == 0 if ok else code == 1 and any("'statsu' is not an element of" in line for line in out), out
        path.write_text(path.read_text().replace(f"      where: \"%pain.{element}.exists() or status = 'active'\"\n",
                                                 "", 1))
    # Alternatives only: a name bound by one branch and again inside another's group is still bound twice.
    branch = "        - as: pain\n          resource: Encounter\n          text: chest pain\n"
    assert branch in path.read_text()
    path.write_text(path.read_text().replace(branch, "        - all:\n            - as: pain\n"
                                                     "              resource: Encounter\n"
                                                     "              text: chest pain\n"))
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any("'pain' is already bound by another clause" in line for line in out), out
    # Alternatives pick alike: which match the name binds must not hang on the order of the branches.
    assert "          text: chest pain\n  none:" in text
    path.write_text(text.replace("ago with no catheterization", "ago (chest pain {{pain.date}}) with no cath")
                    .replace("          text: chest pain\n  none:", "          text: chest pain\n"
                                                                    "          pick: earliest\n  none:"))
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any("all bind 'pain': give them the same `pick`" in line for line in out), out


@pytest.mark.parametrize(("replacement", "needle", "message"), [
    (NESTED.replace("    - any:\n", "    - any:\n        - resource: Flag\n      all:\n"
                    "        - resource: Flag\n", 1),
     "    - any:", "exactly one of all, any or none"),
    (NESTED.replace("          text: chest pain\n        - as: visit", "          colour: red\n        - as: visit"),
     "colour: red", "unknown field 'colour'"),
    (NESTED.replace("  none:\n    - all:\n", "  none:\n    - as: order\n      resource: Flag\n    - all:\n"),
     "as: order", "cannot bind a name"),
    (NESTED.replace("          since: troponin\n        - resource: Procedure",
                    "          since: later\n        - resource: Procedure"), "since: later",
     "'later' is not bound by a clause evaluated before"),
    (NESTED.replace("        - as: visit", "        - as: troponin"), "        - as: troponin", "already bound"),
    (NESTED.replace("  none:\n", "  none:\n    - resource: Patient\n      required: false\n"), "required: false",
     "`required: false` is for what is read from the record"),
])
def test_group_lint_positions(rules_dir: Path, capsys: pytest.CaptureFixture[str], replacement: str, needle: str,
                              message: str) -> None:
    path = nest(rules_dir, replacement)
    code, out = lint(rules_dir, capsys)
    assert code == 1
    hits = [line for line in out if message in line]
    assert hits, out
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text)
    assert int(hits[0].split(":")[1]) == line, (hits[0], line)


def test_card_text_cannot_use_a_name_bound_only_sometimes(rules_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = nest(rules_dir)
    path.write_text(path.read_text().replace("ago with no catheterization", "ago ({{visit.date}}) with no cath"))
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any("visit.date" in line for line in out), out


SECTIONED = ("ago, no cath plan{{#visit}} (visit {{visit.elapsed}} ago){{/visit}}"
             "{{^visit}} (problem list){{/visit}}")


def test_card_sections_show_what_was_bound(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nudges.cards import build_card

    path = nest(rules_dir)
    text = path.read_text()
    old = "ago with no catheterization or cardiology plan"
    assert old in text
    path.write_text(text.replace(old, SECTIONED, 1).replace('summary: "Troponin above its reference range',
                                                            'summary: "Troponin high', 1))
    code, out = lint(rules_dir, capsys)
    assert code == 0, out
    ruleset = load_ruleset(rules_dir).ruleset
    assert ruleset is not None
    service = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"]

    def summary(*resources: dict[str, Any]) -> str:
        record = PatientRecord(service.index)
        record.add_all(resources)
        [match] = [m for m in evaluate(service.rules, record, NOW).matches if m.rule.id == RULE.stem]
        return str(build_card(match, ruleset, {"patientId": "pt-1"}, None, NOW)["summary"])

    visit = {"resourceType": "Encounter", "id": "e1", "status": "in-progress",
             "period": {"start": "2026-03-02T07:00:00Z"}, "reasonCode": [{"text": "chest pain"}]}
    pain = {"resourceType": "Condition", "id": "c1", "code": {"text": "Chest pain"}}
    assert summary(troponin(), visit).endswith("plan (visit 5 h ago)")
    assert summary(troponin(), pain).endswith("plan (problem list)")


@pytest.mark.parametrize(("section", "message"), [
    ("{{#visit}} {{visit.date}}", "never closed"),
    ("{{/visit}}", "closes no open section"),
    ("{{#nobody}}x{{/nobody}}", "which no clause binds"),
    ("{{^visit}} {{visit.date}}{{/visit}}", "'{{visit.date}}' inside {{^visit}}, where 'visit' is not bound"),
    ("{{visit.date}}", "'{{visit.date}}': 'visit' is bound only sometimes (under `any`): put it inside {{#visit}}"),
    ("{{visti.date}}", "unknown placeholder '{{visti.date}}'"),
])
def test_card_section_lint(rules_dir: Path, capsys: pytest.CaptureFixture[str], section: str, message: str) -> None:
    path = nest(rules_dir)
    text = path.read_text()
    path.write_text(text.replace("ago with no catheterization or cardiology plan", "ago " + section, 1))
    code, out = lint(rules_dir, capsys)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("  summary:"))
    assert code == 1 and any(message in entry and f":{line}:" in entry for entry in out), out


@pytest.mark.parametrize(("template", "bound", "shown"), [
    ("a{{#x}}b{{/x}}c", {"x"}, "abc"), ("a{{#x}}b{{/x}}c", set(), "ac"),
    ("a{{^x}}b{{/x}}c", set(), "abc"), ("a{{^x}}b{{/x}}c", {"x"}, "ac"),
    ("{{#x}}{{^y}}n{{/y}}{{#y}}y{{/y}}{{/x}}.", {"x"}, "n."),
    ("{{#x}}{{^y}}n{{/y}}{{#y}}y{{/y}}{{/x}}.", {"x", "y"}, "y."),
    ("a{{/x}}b", set(), "ab"), ("a{{#x}}b", set(), "a"),  # links are not linted: a stray tag as before
    ("{{ #x }}b{{ /x }}", {"x"}, "b"), ("no sections {{now}}", set(), "no sections {{now}}"),
])
def test_sections_are_cut_alike_from_the_plan(template: str, bound: set[str], shown: str) -> None:
    from nudges.rules.templates import pieces, shown_sections

    for _ in range(2):  # the second time from the rendering plan
        assert shown_sections(template, bound.__contains__) == shown
    assert pieces("x {{a.value}} y {{ now }}") == ("x ", "a.value", " y ", "now", "")


def test_a_name_bound_only_under_any_is_empty_where_it_is_unbound(rules_dir: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`%visit` read after an `any` whose Condition branch matched instead: lint took it (visit is bound by
    an earlier clause), and the rule raised on every such record (an undefined variable), its card lost."""
    reading = NESTED.replace("          since: troponin\n", "          since: troponin\n"
                             "          where: \"%visit.exists().not() or status != 'revoked'\"\n", 1)
    nest(rules_dir, reading)
    code, out = lint(rules_dir, capsys)
    assert code == 0, out
    pain = {"resourceType": "Condition", "id": "c1", "code": {"text": "Chest pain"}}
    cath = {"resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order", "code": CATH,
            "subject": {"reference": "Patient/pt-1"}, "authoredOn": "2026-03-02T08:00:00Z"}
    assert fired(rules_dir, troponin(), pain, cath)  # the order alone does not block (the `all` wants both)
