"""`where` answers remembered by the content they read (nudges/rules/fastpath/memo.py).

A memo that keyed an answer by too little would give a wrong card, silently, to the next patient whose
resource differs only where the key does not look. So the analysis is tested on what it must refuse, and
every shipped expression it accepts is tested on every resource of the fixtures and cases: the answer with
every unread element removed, or replaced by something else, is the same; and one memo fed all of them,
twice and under two clocks, always answers as the expression does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastpath_corpus as corpus
import orjson
import pytest

from nudges import engine
from nudges.clock import parse_instant
from nudges.record import PatientRecord
from nudges.rules.compiler import load_ruleset
from nudges.rules.fastpath import memo as memo_module
from nudges.rules.fastpath.memo import Memo, Reads, reads
from nudges.rules.fhirpath import compile_expression, syntax_tree, truthy
from nudges.services import Services

ROOT = Path(__file__).resolve().parent.parent

VALUESETS = corpus.value_sets()
SHIPPED = [s for s in corpus.shipped() if s.field == "where" and reads(syntax_tree(s.expression)) is not None]
# what an unread element is replaced by: shaped like what rules look for (a code, a text, a status)
JUNK = [{"text": "nursing home", "status": "final",
         "coding": [{"system": "http://snomed.info/sct", "code": "160734000"}]}]
BY_TYPE = corpus.by_type()
LATER = corpus.ENV | {"now": "2031-07-01T00:00:00Z", "today": "2031-07-01"}


def compiled(expression: str, resource_type: str) -> Any:
    return compile_expression(expression, resource_type or None, VALUESETS)


def answer(fn: Any, resource: dict[str, Any], env: dict[str, Any]) -> tuple[str, Any]:
    try:
        return "ok", truthy(fn(resource, env))
    except Exception as exc:  # the kind of error is part of the answer
        return "raises", type(exc).__name__


def unread_variants(resource: dict[str, Any], found: Reads) -> list[dict[str, Any]]:
    """The resource with the elements the expression does not read removed, replaced, or added to."""
    unread = [k for k in resource if not found.wants(k)]
    return [{k: v for k, v in resource.items() if found.wants(k)}, {**resource, "zzUnread": JUNK},
            {**resource, **{k: JUNK for k in unread if k != "resourceType"}}]


@pytest.mark.parametrize("text", [
    "$this.status = 'finished'", "%context.status = 'finished'", "%resource.code.exists()",
    "%patient.gender = 'female'", "%labResult.value.exists()", "children().exists()",
    "code.descendants().where(code = '1').exists()", "Encounter = Encounter", "(Encounter | Encounter).count() = 1",
    "toString().contains('AMA')", "select($this).count() = 1", "where($this.status = 'x').exists()",
    "iif(status.exists(), $this, {}).count() = 1", "Encounter.combine(Encounter).count() = 2",
    "first() = first()", "Encounter is Encounter"])
def test_what_may_see_the_resource_whole_is_not_remembered(text: str) -> None:
    assert reads(syntax_tree(text)) is None, text


def test_names_scalars_and_twins_are_read() -> None:
    found = reads(syntax_tree(
        "status != 'cancelled' and code.coding.where($this.system = 'http://loinc.org' and code = '1').exists() "
        "and value.ofType(Quantity).value > 5 and extension('http://x').exists() and %now > effective.ofType(dateTime)"
        " and Observation.category.exists()"))
    assert found is not None
    assert {"status", "code", "value", "extension", "effective", "category", "resourceType"} <= found.names
    assert found.scalars == ("now",)
    for key in ("status", "_status", "valueQuantity", "_valueString", "effectiveDateTime", "extension"):
        assert found.wants(key), key
    for key in ("subject", "id", "note", "issued", "_issued", "meta"):
        assert not found.wants(key), key


def test_the_shipped_where_clauses_are_nearly_all_remembered() -> None:
    shipped = [s for s in corpus.shipped() if s.field == "where" and not s.bindings]
    assert len(SHIPPED) >= 0.9 * len(shipped)


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda s: f"{s.resource_type}:{s.expression[:60]}")
def test_a_remembered_answer_depends_only_on_what_is_read(shipped: corpus.Shipped) -> None:
    found = reads(syntax_tree(shipped.expression))
    assert found is not None
    fn = compiled(shipped.expression, shipped.resource_type)
    memo = Memo(fn, found)
    distinct: dict[bytes, dict[str, Any]] = {}  # one resource per content read: the rest only repeat it
    for resource, _ in BY_TYPE.get(shipped.resource_type, []):
        distinct.setdefault(orjson.dumps([(k, v) for k, v in resource.items() if found.wants(k)]), resource)
    resources = list(distinct.values())
    assert resources, shipped.resource_type
    for resource in resources:
        expected = answer(fn, resource, corpus.ENV)
        for variant in unread_variants(resource, found):
            assert answer(fn, variant, corpus.ENV) == expected, (shipped.expression, resource.get("id"), variant)
    clocks = (corpus.ENV, corpus.ENV, LATER) if found.scalars else (corpus.ENV, corpus.ENV)
    for env in clocks:  # twice, the second time from memory; then under another clock
        for resource in resources:
            expected = answer(fn, resource, env)
            if expected[0] == "ok":
                assert memo.held(resource, env) is expected[1], (shipped.expression, resource.get("id"))


def test_the_check_above_would_notice_a_name_left_out() -> None:
    """The variants are what make the test above able to fail: a key missing `status` gives them away."""
    text = "status != 'cancelled' and code.coding.exists()"
    found = reads(syntax_tree(text))
    assert found is not None
    blind = Reads(found.names - {"status"}, found.scalars)
    fn = compiled(text, "Observation")
    resource = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"code": "1"}]}}
    assert any(answer(fn, v, corpus.ENV) != answer(fn, resource, corpus.ENV) for v in unread_variants(resource, blind))


class Counting:
    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, resource: Any, env: Any) -> list[Any]:
        self.calls += 1
        result: list[Any] = self.fn(resource, env)
        return result


def test_the_memo_asks_once_per_content_and_again_when_it_changes() -> None:
    text = "status != 'cancelled' and period.start < %now"
    fn = Counting(compiled(text, "Encounter"))
    found = reads(syntax_tree(text))
    assert found is not None
    memo = Memo(fn, found)
    visit = {"resourceType": "Encounter", "id": "a", "status": "finished", "period": {"start": "2026-01-01"},
             "subject": {"reference": "Patient/1"}}
    assert memo.held(visit, corpus.ENV) is True
    assert memo.held({**visit, "id": "b", "subject": {"reference": "Patient/2"}}, corpus.ENV) is True
    assert fn.calls == 1  # another patient's visit with the same status and period: from memory
    assert memo.held({**visit, "status": "cancelled"}, corpus.ENV) is False
    assert memo.held(visit, corpus.ENV | {"now": "2025-01-01T00:00:00Z"}) is False  # the clock is in the key
    assert memo.held({**visit, "_status": {"extension": []}}, corpus.ENV) is True
    assert fn.calls == 4


def test_the_memo_turns_itself_off_where_answers_do_not_repeat_and_stays_right() -> None:
    text = "value.ofType(Quantity).value > 50"
    fn = compiled(text, "Observation")
    found = reads(syntax_tree(text))
    assert found is not None
    memo = Memo(fn, found)
    for i in range(Memo.WINDOW + 10):
        resource = {"resourceType": "Observation", "valueQuantity": {"value": i / 10}}
        assert memo.held(resource, corpus.ENV) is (i / 10 > 50)
    assert memo.off


def test_the_memo_is_bounded_and_copes_with_values_that_are_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Memo, "LIMIT", 50)
    monkeypatch.setattr(Memo, "FLOOR", 0.0)
    text = "code.text = 'x'"
    found = reads(syntax_tree(text))
    assert found is not None
    memo = Memo(compiled(text, "Condition"), found)
    for i in range(200):
        assert memo.held({"resourceType": "Condition", "code": {"text": "x" if i % 2 else str(i)}}, corpus.ENV) is (
            i % 2 == 1)
    assert len(memo._answers) <= 50
    for i in range(3_000):  # a body with endless invented element names does not grow the memo's name cache
        memo.held({"resourceType": "Condition", "code": {"text": "x"}, f"invented{i}": 1}, corpus.ENV)
    assert len(memo._wanted) <= memo_module.NAMES_LIMIT
    assert memo.held({"resourceType": "Condition", "code": {"text": "x"}, "meta": {"at": object()}}, corpus.ENV)
    assert memo.held({"resourceType": "Condition", "code": {"text": object()}}, corpus.ENV) is False


def test_a_later_call_takes_the_answer_from_memory_and_gives_the_same_cards() -> None:
    """Two calls on records that differ only in ids: the second patient's encounter `where` is not
    evaluated again, and both get the card; a traced run (nudges explain) evaluates it for itself."""
    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    service = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"]
    rule = next(r for r in service.rules if r.id == "elder-abuse-screen-care-facility")
    clause = next(c for c in rule.clauses() if c.resource == "Encounter")
    assert clause.memo is not None
    counting = clause.memo.where = Counting(clause.memo.where)
    now = parse_instant("2026-03-02T12:00:00Z")

    def record(n: int) -> PatientRecord:
        found = PatientRecord(service.index)
        found.add_all([
            {"resourceType": "Patient", "id": f"p{n}", "birthDate": "1940-02-02"},
            {"resourceType": "Encounter", "id": f"e{n}", "status": "finished",
             "subject": {"reference": f"Patient/p{n}"}, "class": {"code": "IMP"},
             "period": {"start": "2026-01-03T08:00:00Z", "end": "2026-01-07T12:00:00Z"},
             "hospitalization": {"admitSource": {"coding": [{
                 "system": "http://terminology.hl7.org/CodeSystem/admit-source", "code": "nursing"}]}}}])
        return found

    first, second = (engine.evaluate((rule,), record(n), now, {"patientId": f"p{n}"}, "patient-view") for n in (1, 2))
    assert [m.rule.id for m in first.matches] == [m.rule.id for m in second.matches] == [rule.id]
    assert counting.calls == 1
    traced = engine.evaluate((rule,), record(3), now, {"patientId": "p3"}, "patient-view", trace=Silent())
    assert [m.rule.id for m in traced.matches] == [rule.id]
    assert counting.calls == 1  # the traced run did not use the memo (it evaluates clause.where itself)


class Silent:
    """A tracer that listens to nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
