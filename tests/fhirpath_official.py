"""The HL7 FHIRPath R4 test suite (tests/fhirpath_suite/tests-fhir-r4.xml, vendored with its inputs; see
the README there for where they come from and their licences), run through both FHIRPath forms.

Why both: the compiled form must agree with fhirpathpy on every case it compiles; how many cases give
the suite's expected output is reported for each, so a fhirpathpy deviation is told apart from ours."""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from fastpath_corpus import R4, canon
from fhirpathpy.engine.nodes import FP_Quantity, FP_TimeBase
from fhirpathpy.parser import parse

from nudges.rules.fastpath import compile_fast
from nudges.rules.fastpath.ops import Types
from nudges.rules.fhirpath import interpreted, member_of

SUITE = Path(__file__).resolve().parent / "fhirpath_suite"
# What the suite expects an engine to provide (FHIRPath 2.0 section 9, FHIR's %vs-/%ext- conventions).
SUITE_ENV = {"sct": "http://snomed.info/sct", "loinc": "http://loinc.org",
             "vs-administrative-gender": "http://hl7.org/fhir/ValueSet/administrative-gender",
             "ext-patient-birthTime": "http://hl7.org/fhir/StructureDefinition/patient-birthTime"}


@dataclass
class Case:
    name: str
    group: str
    expression: str
    inputfile: str
    outputs: list[tuple[str, str]] = field(default_factory=list)
    invalid: str | None = None
    predicate: bool = False


@functools.cache
def load_input(name: str) -> Any:
    """The JSON twin of an XML input file (patient-example.xml -> patient-example.json)."""
    return orjson.loads((SUITE / (name.removesuffix(".xml") + ".json")).read_bytes())


def cases() -> list[Case]:
    found = []
    root = ET.fromstring((SUITE / "tests-fhir-r4.xml").read_bytes())
    for group in root.iter("group"):
        for test in group.iter("test"):
            expression = test.find("expression")
            if expression is None or expression.text is None:
                continue
            found.append(Case(
                name=test.get("name", ""), group=group.get("name", ""), expression=expression.text,
                inputfile=test.get("inputfile", ""),
                outputs=[(o.get("type", ""), o.text or "") for o in test.findall("output")],
                invalid=expression.get("invalid") or test.get("invalid"),
                predicate=test.get("predicate") == "true"))
    return found


def matches_expected(case: Case, result: list[Any] | None, raised: bool) -> bool:
    """Whether an outcome is the one the suite expects: an error for invalid tests, else the outputs in
    order (booleans, integers, decimals and strings as values; dates and quantities by their text)."""
    if case.invalid:
        return raised
    if raised or result is None:
        return False
    if case.predicate:
        result = [len(result) > 0]
    if len(result) != len(case.outputs):
        return False
    return all(_same(kind, text, got) for (kind, text), got in zip(case.outputs, result, strict=True))


def _same(kind: str, text: str, got: Any) -> bool:
    if kind == "boolean":
        return got is (text == "true")
    if kind == "integer":
        return type(got) is int and got == int(text)
    if kind == "decimal":
        return not isinstance(got, bool) and isinstance(got, int | Decimal) and Decimal(got) == Decimal(text)
    if kind in ("date", "dateTime", "time"):
        shown = getattr(got, "asStr", None) if isinstance(got, FP_TimeBase) else got
        return isinstance(shown, str) and shown.lstrip("@T") == text.lstrip("@T")
    if kind == "Quantity":
        value, _, unit = text.partition(" ")
        return isinstance(got, FP_Quantity) and Decimal(str(got.value)) == Decimal(value) and got.unit == unit
    return isinstance(got, str) and got == text


def run() -> dict[str, Any]:
    """Coverage and agreement over the whole suite. fhirpathpy's parser is run once per expression and
    both forms evaluate that tree; an expression it cannot parse is outside the subset by definition."""
    member = member_of({})
    stats: dict[str, Any] = {"cases": 0, "in_subset": 0, "compiled_expected": 0, "fhirpathpy_expected": 0,
                             "agree": 0, "disagree": [], "both_off_spec": [], "compiled_off_only": [], "outside": []}
    for case in cases():
        stats["cases"] += 1
        resource = load_input(case.inputfile)
        try:
            tree = parse(case.expression)
        except Exception:  # ANTLR's lexer errors: fhirpathpy refuses the text too
            stats["outside"].append((case.name, case.expression))
            continue
        fast = compile_fast(tree, {}, member)
        if fast is None:
            stats["outside"].append((case.name, case.expression))
            continue
        stats["in_subset"] += 1
        outcomes: list[tuple[list[Any] | None, str | None]] = []
        for fn in (interpreted(tree, member), fast):
            Types.model = R4
            try:
                outcomes.append((fn(resource, SUITE_ENV), None))
            except Exception as exc:  # the type is the outcome
                outcomes.append((None, type(exc).__name__))
        (ref, ref_err), (got, got_err) = outcomes
        ok_ref = matches_expected(case, ref, ref_err is not None)
        ok_got = matches_expected(case, got, got_err is not None)
        stats["fhirpathpy_expected"] += ok_ref
        stats["compiled_expected"] += ok_got
        if (canon(ref), ref_err) == (canon(got), got_err):
            stats["agree"] += 1
        else:
            stats["disagree"].append((case.name, case.expression, ref, ref_err, got, got_err))
        if not ok_got:
            (stats["both_off_spec"] if not ok_ref else stats["compiled_off_only"]).append((case.name, case.expression))
    return stats
