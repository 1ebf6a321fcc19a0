"""FHIRPath for rule authors: strict parsing (fhirpathpy silently recovers from syntax errors), compile
once at load, and the one environment every evaluation sees (%now / %today from the injected clock, the
hook and its context ids)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from antlr4 import CommonTokenStream, InputStream
from antlr4.error.ErrorListener import ErrorListener
from fhirpathpy import __version__ as FHIRPATHPY_VERSION
from fhirpathpy import apply_parsed_path
from fhirpathpy.engine.nodes import TypeInfo
from fhirpathpy.engine.util import set_paths
from fhirpathpy.models import models
from fhirpathpy.parser import parse
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

from ..fhir import canonical_system, instant
from . import cache
from .elements import problems as element_problems
from .fastpath import compile_fast

R4 = models["r4"]
TypeInfo.model = R4  # type: ignore[assignment]  # fhirpathpy keeps the model of is/as/ofType in a global: set once, not by the first `as`
_CLOCK_FUNCTIONS = re.compile(r"\b(now|today|timeOfDay)\s*\(")
# Anything that reads race or ethnicity: US Core extensions, the CDC race/ethnicity code system,
# or fields literally named so. Used to keep triggers universal.
RACE_READ = re.compile(
    r"us-core-(race|ethnicity)|2\.16\.840\.1\.113883\.6\.238|ombCategory|\brace\b|\bethnicity\b",
    re.IGNORECASE,
)

Compiled = Callable[[Any, dict[str, Any]], list[Any]]
ValueSets = Mapping[str, frozenset[tuple[str, str]]]
MEMBER_OF = re.compile(r"\bmemberOf\s*\(\s*(?:'((?:[^'\\]|\\.)*)'\s*\)|([^)]*)\))")


CONTEXT_VARIABLES = ("patientId", "encounterId", "userId")


def environment(now: datetime, context: Mapping[str, Any] | None = None, hook: str | None = None,
                patient: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The variables every expression sees: %now, %today, %hook, the context's %patientId, %encounterId and
    %userId, and %patient (the Patient resource, e.g. to pick a sex-specific reference range with
    `referenceRange.where(appliesTo.coding.code contains %patient.gender)`). A value the call does not
    have is empty, so comparisons with it are empty (never an error): one builder for hook calls,
    follow-up starts and due follow-ups alike."""
    env: dict[str, Any] = {"now": instant(now), "today": now.date().isoformat()}
    for name in CONTEXT_VARIABLES:
        value = (context or {}).get(name)
        env[name] = value if isinstance(value, str) else []
    env["hook"] = hook or []
    env["patient"] = patient if patient is not None else []
    return env


# What a compiled expression is tried on at load, so unknown functions surface before any patient's data.
SAMPLE_ENVIRONMENT = environment(datetime(2000, 1, 1, tzinfo=UTC), {
    "patientId": "example", "encounterId": "example", "userId": "Practitioner/example"}, "patient-view",
    {"resourceType": "Patient", "id": "example", "gender": "unknown"})


class FhirPathSyntaxError(ValueError):
    def __init__(self, message: str, column: int) -> None:
        super().__init__(message)
        self.column = column


class _Raise(ErrorListener):
    def syntaxError(self, recognizer: Any, offending: Any, line: int, column: int, msg: str, e: Any) -> None:
        raise FhirPathSyntaxError(f"FHIRPath syntax error: {msg}", column)


def check_syntax(expression: str) -> None:
    listener = _Raise()
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(listener)
    parser = FHIRPathParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(listener)
    parser.entireExpression()  # requires EOF: trailing input is an error


def syntax_tree(expression: str) -> Any:
    """fhirpathpy's syntax tree of a strictly checked expression; both parses (ANTLR in pure Python) are
    most of a rule load's time, so the tree is cached by the expression's text."""
    entry = cache.key("fhirpath", FHIRPATHPY_VERSION.encode(), expression.encode())
    tree = cache.lookup(entry)
    if tree is None:
        check_syntax(expression)
        tree = parse(expression)
        cache.store(entry, tree)
    return tree


def _key(coding: dict[str, Any]) -> tuple[Any, Any]:
    system = coding.get("system")
    return (canonical_system(system) if isinstance(system, str) else system), coding.get("code")


def member_of(valuesets: ValueSets) -> Callable[[list[Any], str], list[bool]]:
    """FHIRPath's memberOf(valueset) over the rule set's own value sets, named as in `codes:`.

    As the FHIR terminology function: on one Coding, whether it is in the set; on one CodeableConcept,
    whether any of its codings is; on one code string, whether the set has that code in any system;
    empty when the input is empty or holds more than one item."""

    def member(inputs: list[Any], name: str) -> list[bool]:
        keys = valuesets[name]  # names are checked at load (value_set_names)
        if len(inputs) != 1:
            return []
        item = inputs[0]
        if isinstance(item, str):
            return [any(code == item for _, code in keys)]
        if not isinstance(item, dict):
            return []
        codings = item.get("coding") if "coding" in item else [item]
        return [isinstance(codings, list) and any(isinstance(c, dict) and _key(c) in keys for c in codings)]

    return member


def value_set_names(expression: str, valuesets: ValueSets) -> None:
    """memberOf must name a known value set in quotes: checked here, so evaluation cannot fail on it."""
    for match in MEMBER_OF.finditer(expression):
        name = match.group(1)
        if name is None:
            raise FhirPathSyntaxError("memberOf takes a value set name in quotes, e.g. memberOf('hba1c')",
                                      match.start())
        if name not in valuesets:
            from .resources import did_you_mean

            raise FhirPathSyntaxError(f"memberOf: unknown value set '{name}'{did_you_mean(name, set(valuesets))}",
                                      match.start(1))


_CALL = re.compile(r"(?<![\w%$])([A-Za-z_]\w*)\s*\(")
_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`")
_OPERATORS = frozenset({"and", "or", "xor", "implies", "div", "mod", "in"})  # `a and (b)`: not a call


def functions() -> frozenset[str]:
    """The FHIRPath functions a rule may call: fhirpathpy's, memberOf, not the clock's."""
    from fhirpathpy.engine.invocations import invocation_registry

    names = {n for n in invocation_registry if n[:1].isalpha() and not n.endswith("Op")} - _OPERATORS
    return frozenset(names - {"now", "today", "timeOfDay"} | {"memberOf"})


def function_names(expression: str) -> None:
    """Every `name(` is a function FHIRPath knows, or the error names the closest one."""
    from .resources import did_you_mean

    known = functions()
    text = _LITERAL.sub(lambda m: " " * len(m.group()), expression)  # no calls inside string literals
    for match in _CALL.finditer(text):
        name = match.group(1)
        if name not in known and name not in _OPERATORS:
            raise FhirPathSyntaxError(f"unknown FHIRPath function '{name}()'{did_you_mean(name, known)}",
                                      match.start(1))


def interpreted(tree: Any, member: Callable[[list[Any], str], list[bool]]) -> Compiled:
    """fhirpathpy's interpreter over a syntax tree, in the R4 model, with `member` as memberOf: the
    reference the compiled form (fastpath) must agree with, and the fallback for what it does not cover."""
    functions = {"memberOf": {"fn": member, "arity": {1: ["String"]}}}
    compiled: Compiled = set_paths(apply_parsed_path, parsedPath=tree, model=R4,
                                   options={"userInvocationTable": functions})
    return compiled


def compile_expression(expression: str, resource_type: str | None = None,
                       valuesets: ValueSets | None = None, bound: Collection[str] | Mapping[str, str] = ()) -> Compiled:
    """Parse strictly, check function names, then dry-run on an empty resource so wrong arity, a variable
    that is never defined (`%encounterID`, a clause's own name) and the like surface at load time rather
    than as a rule that raises on every patient's record. `bound`: the names earlier clauses bind (with their
    resource types, when known: `%lab.valeu` is then checked as `valeu` on an Observation).

    An expression compiled before with the same inputs is given again (_COMPILED): checking and translating
    were most of a rule set's load, and a hot reload after one rule's edit, or a test suite that starts
    a service per test, compiles the same expressions again and again. A compiled expression is a pure
    function of its text, resource type, bound names and the codes of the value sets it names (memberOf
    takes only quoted names, value_set_names), so those are its key; what failed is never kept."""
    key = _compiled_key(expression, resource_type, valuesets or {}, bound)
    found = _COMPILED.get(key) if key is not None else None
    if found is None:
        found = _compile_expression(expression, resource_type, valuesets, bound)
        if key is not None:
            cache.keep(_COMPILED, key, found, COMPILED_LIMIT)
    return found


COMPILED_LIMIT = 4_096  # compiled expressions kept (the catalog has a few hundred)
_COMPILED: dict[tuple[Any, ...], Compiled] = {}


def _compiled_key(expression: str, resource_type: str | None, valuesets: ValueSets,
                  bound: Collection[str] | Mapping[str, str]) -> tuple[Any, ...] | None:
    names = sorted({m.group(1) for m in MEMBER_OF.finditer(expression)} - {None})
    if any(name not in valuesets for name in names):
        return None  # an error to report: compiled (and refused) each time
    given = tuple(sorted(bound.items())) if isinstance(bound, Mapping) else tuple(sorted(bound))
    return (expression, resource_type, isinstance(bound, Mapping), given,
            tuple((name, valuesets[name]) for name in names))


def _compile_expression(expression: str, resource_type: str | None, valuesets: ValueSets | None,
                        bound: Collection[str] | Mapping[str, str]) -> Compiled:
    if _CLOCK_FUNCTIONS.search(expression):
        raise FhirPathSyntaxError("use %now or %today instead of now()/today(): the clock is injected", 0)
    function_names(expression)
    value_set_names(expression, valuesets or {})
    member = member_of(valuesets or {})
    tree = syntax_tree(expression)
    for name, problem in _element_problems(tree, resource_type, bound if isinstance(bound, Mapping) else {}):
        raise FhirPathSyntaxError(problem, max(expression.find(name), 0))
    if (units := _time_unit_problem(expression, raised=False)) is not None:
        raise units
    for name, at in variables(expression):
        if name not in SAMPLE_ENVIRONMENT and name not in bound and name not in INTERPRETER_VARIABLES:
            raise _undefined(name, at, bound)
    # The expression as closures where it lies in the compiled subset (about ten times faster on the
    # catalog; identical results, errors included: tests/test_fastpath.py), else fhirpathpy's interpreter.
    compiled = compile_fast(tree, valuesets or {}, member) or interpreted(tree, member)
    probe = {"resourceType": resource_type} if resource_type else {}
    env = dict(SAMPLE_ENVIRONMENT) | {name: {} for name in bound}
    try:
        compiled(probe, env)
    except Exception as exc:  # fhirpathpy raises bare Exception for semantic errors
        message = str(exc)
        if "Not implemented" in message or "arity" in message or "not supported" in message.lower():
            raise FhirPathSyntaxError(f"FHIRPath error: {message}", 0) from exc
        if "date/time arithmetic" in message:  # on the empty probe only constants do arithmetic: every call
            raise _time_unit_problem(expression, raised=True) or FhirPathSyntaxError(message, 0) from exc
        undefined = _UNDEFINED.search(message)
        if undefined:
            name = undefined.group(1)
            raise _undefined(name, max(expression.find("%" + name), 0), bound) from exc
    return compiled


_UNDEFINED = re.compile(r"undefined environment variable:?\s*%?([A-Za-z_][\w]*)")
# fhirpathpy's own variables: %context (the resource evaluated) and %ucum.
INTERPRETER_VARIABLES = frozenset({"context", "ucum"})
# What every expression reads the same way throughout a call; no clause may bind these names (schema.Clause).
CALL_WIDE = frozenset(SAMPLE_ENVIRONMENT) | INTERPRETER_VARIABLES
# A string literal or a delimited identifier (skipped whole), or a variable: %name or %`name`.
_VARIABLE = re.compile(r"'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`|%(`(?:[^`\\]|\\.)*`|[A-Za-z_]\w*)")


def variables(expression: str) -> Iterator[tuple[str, int]]:
    """Each %variable the expression names, and where. Read from the text because the load-time dry run
    on an empty resource never evaluates what lies inside `where()`, `select()` or `iif()`: a `%resource`
    there passed lint and then raised on every record with a candidate."""
    for found in _VARIABLE.finditer(expression):
        if found.group(1) is not None:
            yield found.group(1).strip("`"), found.start()


def call_wide(expression: str) -> bool:
    """Whether the expression reads only names that hold for a whole call (the clock, the hook's context,
    the patient), none a clause binds: its answer for one resource is then the same in every rule."""
    return all(name in CALL_WIDE for name, _ in variables(expression))


def shared_text(expression: str | None, compiled: Compiled | None) -> str | None:
    """The text a compiled, call-wide expression is shared by across a call (CompiledClause.settled, .dated)."""
    return expression if compiled is not None and expression is not None and call_wide(expression) else None


def _undefined(name: str, at: int, bound: Collection[str] | Mapping[str, str]) -> FhirPathSyntaxError:
    from .resources import did_you_mean

    hint = did_you_mean(f"%{name}", {f"%{known}" for known in (*SAMPLE_ENVIRONMENT, *bound)})
    return FhirPathSyntaxError(
        f"%{name} is not defined here{hint}: an expression reads %now, %today, %hook, %patient, "
        f"%patientId, %encounterId, %userId and the names of earlier clauses "
        f"({', '.join('%' + b for b in sorted(bound)) or 'none'}); a clause's own name is bound only "
        "once it has matched", at)


# A string literal (skipped whole, so a quote inside one is never taken for a unit) or a quantity: a number
# and its quoted unit.
_TOKEN = re.compile(r"'(?:[^'\\]|\\.)*'|(?<![\w.])(\d+(?:\.\d+)?)\s*'((?:[^'\\]|\\.)*)'")
_UCUM_TIME = frozenset({"wk", "d", "h", "min", "s", "ms"})
_CALENDAR = {"a": "year", "mo": "month", "ann": "year"} | {w: w for w in (
    "year", "month", "week", "day", "hour", "minute", "second", "millisecond")}


def _element_problems(tree: Any, resource_type: str | None, bound: Mapping[str, str]) -> list[tuple[str, str]]:
    """elements.element_problems; a name the items of an `any` bind as different types ("Observation|
    QuestionnaireResponse", compiler) is checked as each, and an element is wrong only if no type has it."""
    mixed = {name: kinds.split("|") for name, kinds in bound.items() if "|" in kinds}
    variants = [dict(bound)] if not mixed else [
        {**bound, **dict(zip(mixed, chosen, strict=True))} for chosen in itertools.product(*mixed.values())]
    found = [list(element_problems(tree, resource_type, variant)) for variant in variants]
    return [(name, problem) for name, problem in found[0]
            if all(any(other == name for other, _ in rest) for rest in found[1:])]


def _quantities(expression: str) -> Iterator[tuple[int, str, str, str | None, bool]]:
    """Each quantity with a quoted unit that is no UCUM time: where it starts, its number and unit, the
    calendar word it stands for (None for another unit), and whether a + or - comes just before it."""
    for found in _TOKEN.finditer(expression):
        number, unit = found.group(1), found.group(2)
        if number is None or unit in _UCUM_TIME:
            continue
        word = _CALENDAR.get(unit) or _CALENDAR.get(unit.lower().removesuffix("s"))
        yield found.start(), number, unit, word, expression[:found.start()].rstrip().endswith(("+", "-"))


def _time_unit_problem(expression: str, raised: bool) -> FhirPathSyntaxError | None:
    """`%now - 2 'days'`: a quoted unit is UCUM's, and 'days' is not, so the expression raises on every
    call. Found in the text wherever a calendar word is added or taken away (inside `where()` or `iif()`,
    which the dry run on an empty resource never reaches); when the dry run did raise (`raised`), the
    likeliest culprit is named even if it is no calendar word."""
    found = list(_quantities(expression))
    culprits = [q for q in found if q[3] is not None and q[4]]
    if not culprits and raised:
        culprits = [q for q in found if q[4]] or found
    if not culprits:
        return None if not raised else FhirPathSyntaxError(
            "date arithmetic needs a time unit: write a calendar duration such as `2 days` or a UCUM one such "
            "as `2 'd'`", 0)
    at, number, unit, word, _ = culprits[0]
    fix = f"the calendar duration `{number} {word}{'' if number == '1' else 's'}`" if word else \
        "a calendar duration such as `2 days`"
    return FhirPathSyntaxError(
        f"{number} '{unit}' cannot be added to or taken from a date: a quoted unit is a UCUM unit, and only "
        f"'wk', 'd', 'h', 'min', 's' and 'ms' are times there; write {fix} (unquoted: years, months, weeks, "
        "days, hours, minutes, seconds)", at)


def truthy(result: list[Any]) -> bool:
    """FHIRPath boolean semantics for a `where`: a single true value; empty is false."""
    return (len(result) == 1 and result[0] is True) or (bool(result) and all(r is True for r in result))
