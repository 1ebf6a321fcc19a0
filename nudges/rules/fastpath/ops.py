"""The native operations of compiled FHIRPath (see translate.py): each takes fhirpathpy's evaluated
operands and returns what fhirpathpy's own function would, written after fhirpathpy 2.2.4 line for line
(quirks included), handing anything but the common cases to that function."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from datetime import date
from decimal import Decimal
from typing import Any, cast

from fhirpathpy.engine import (
    check_boolean_param,
    check_integer_param,
    check_number_param,
    check_string_param,
    util,
)
from fhirpathpy.engine.invocations import invocation_registry as _registry
from fhirpathpy.engine.invocations.collections import inn
from fhirpathpy.engine.invocations.equality import equality
from fhirpathpy.engine.invocations.existence import distinct_fn
from fhirpathpy.engine.nodes import FP_DateTime, FP_Quantity, FP_Type, ResourceNode, TypeInfo
from fhirpathpy.models import models

invocation_registry: dict[str, dict[str, Any]] = cast(dict[str, dict[str, Any]], _registry)
Types: Any = TypeInfo  # fhirpathpy declares TypeInfo.model None; it is the global model of is/as
ev = importlib.import_module("fhirpathpy.engine.evaluators")  # the package re-exports a dict by that name

R4: dict[str, Any] = models["r4"]
Ctx = dict[str, Any]  # as fhirpathpy's: "$this", "$index", "$total", "dataRoot", "model"; plus env, resource
Eval = Callable[[Ctx, list[Any]], list[Any]]  # (context, focus collection) -> result collection
Maker = Callable[[Ctx, list[Any]], Any]  # builds one parameter, as engine.make_param
Compiled = Callable[[Any, Mapping[str, Any]], list[Any]]
ValueSets = Mapping[str, frozenset[tuple[str, str]]]
_Plan = tuple[list[tuple[str, str, str]] | None, str, str]  # choice fields, element type, type under a mapping

# Every function fhirpathpy 2.2.4 implements (see _Compiler.function for what is native), plus nudges'
# memberOf. Outside: functions fhirpathpy lacks (escape, conformsTo, ...), wrong arities, unknown memberOf
# value sets; everything fhirpathpy fails to parse.
SUPPORTED_FUNCTIONS = frozenset(
    {name for name in invocation_registry if name.isalpha() and not name.endswith("Op")}
    - {"and", "or", "xor", "implies", "div", "mod"} | {"memberOf"})  # operators, not functions
# The copy is of fhirpathpy 2.2.4's evaluator (parameter plumbing, navigation, where): another version
# may differ, so compile_fast then declines everything and fhirpathpy runs as before.
FHIRPATHPY_VERSION = "2.2.4"
_CLOCK = frozenset({"now", "today", "timeOfDay"})  # fhirpathpy resets its clock per evaluation
_ALIAS = {"MembershipExpression": {"contains": "containsOp", "in": "inOp"},
          "TypeExpression": {"is": "isOp", "as": "asOp"}}
_OPERATORS = {"UnionExpression", "InequalityExpression", "AdditiveExpression", "MultiplicativeExpression",
              "EqualityExpression", "OrExpression", "ImpliesExpression", "AndExpression", "XorExpression"}
_PASS_THROUGH = {"TermExpression", "InvocationTerm", "ParenthesizedTerm", "LiteralTerm"}
_LITERALS = {"BooleanLiteral": ev.boolean_literal, "NumberLiteral": ev.number_literal,
             "StringLiteral": ev.string_literal, "QuantityLiteral": ev.quantity_literal,
             "DateTimeLiteral": ev.date_time_literal, "TimeLiteral": ev.time_literal,
             "NullLiteral": ev.null_literal}
_CHECKS: dict[str, Callable[[Any], Any]] = {"Integer": check_integer_param, "Number": check_number_param,
                                           "Boolean": check_boolean_param, "String": check_string_param}
_UCUM = "http://unitsofmeasure.org"
_PLAIN = frozenset({str, int, bool, float, Decimal, dict, list, type(None)})  # `==` is Python's ==
_NUMBER = frozenset({int, Decimal})  # util.is_number, less complex (Python cannot order those)
_HASHABLE = frozenset({str, int, bool, float, Decimal})
_SCALAR = frozenset({str, int, bool, float, list, type(None)})  # surely not a Mapping
_FULL_DATE = re.compile(r"(19|[2-9]\d)\d\d-\d\d-\d\d")  # years fhirpathpy can take a timestamp of
_MEMO_SIZE = 4096


class Unsupported(Exception):
    """Raised while compiling when the expression leaves the subset; compile_fast turns it into None."""


class _Node(ResourceNode):
    """fhirpathpy's ResourceNode without the cost of its generic constructor.

    Being a real ResourceNode is what keeps results exact: fhirpathpy's functions, equality, hashing
    (for `|` and repeat), type checks and printing see exactly what they see under fhirpathpy."""

    _data = None
    propName = None  # fhirpathpy builds these only for its debugging paths
    index = None

    def __init__(self, data: Any, path: str | None) -> None:
        kind = type(data)
        if (kind is dict or (kind not in _SCALAR and isinstance(data, Mapping))) and "resourceType" in data:
            path = data["resourceType"]  # as ResourceNode: a (contained) resource types itself
        self.data = data
        self.path = path


_Node.__module__, _Node.__qualname__, _Node.__name__ = ResourceNode.__module__, "ResourceNode", "ResourceNode"


def _arraify(x: Any) -> list[Any]:
    """util.arraify: a list as is, None as empty, anything else as a singleton."""
    return x if isinstance(x, list) else [] if x is None else [x]


def _empty(x: Any) -> bool:
    """util.is_nullable."""
    return x is None or (isinstance(x, list) and not x)


def _add(acc: list[Any], got: Any, path: str) -> None:
    """The tail of create_reduce_member_invocation: a found value (or each of a list) as typed nodes."""
    if isinstance(got, list):
        acc += [x if isinstance(x, ResourceNode) else _Node(x, path) for x in got]
    elif got is not None:
        acc.append(got if isinstance(got, ResourceNode) else _Node(got, path))


def add_element(acc: list[Any], value: Any, extra: Any, path: str) -> None:
    """An element found under `key` and its `_key` twin (the primitive's id and extensions, FHIR JSON's
    representation of one element in two properties) as one node each, the twin kept as the node's `_data`.

    fhirpathpy 2.2.4 adds the twin as a second item: `questionnaire` beside `_questionnaire` is two
    items, and `questionnaire.contains('x')`, `birthDate.toDate()` or a comparison with the value then
    raise on data as US Core sends it (its examples carry such extensions), and the rule fails. FHIRPath
    (and fhirpath.js) see one element; so do both forms here (patched into fhirpathpy below). A twin
    without a value (an element that is only extensions, such as a data-absent-reason) stays an item of
    its own, as before."""
    if value is None:
        _add(acc, extra, path)
    elif extra is None:
        _add(acc, value, path)
    elif isinstance(value, list):
        twins = extra if isinstance(extra, list) else []
        for i, item in enumerate(value):
            twin = twins[i] if i < len(twins) else None
            if item is None:
                _add(acc, twin, path)
            elif isinstance(item, ResourceNode):
                acc.append(item)
            else:
                node = _Node(item, path)
                if twin is not None:
                    node._data = twin
                acc.append(node)
    elif isinstance(value, ResourceNode):
        acc.append(value)
    else:
        node = _Node(value, path)
        node._data = extra
        acc.append(node)


def twin_member(node: Any, key: str) -> Any:
    """A member of a primitive's twin (`birthDate.extension`, `code.id`): what FHIRPath reads on the
    primitive itself."""
    twin = getattr(node, "_data", None)
    return twin.get(key) if isinstance(twin, Mapping) else None


def _member_reduction(model: Any, key: str) -> Callable[[list[Any], Any], list[Any]]:
    """fhirpathpy's create_reduce_member_invocation with an element and its `_` twin as one node
    (add_element); its model look-ups as fhirpathpy makes them. Installed in fhirpathpy below, so both
    FHIRPath forms navigate alike."""

    def reduce(acc: list[Any], res: Any) -> list[Any]:
        res = ResourceNode.create_node(res)
        child = f"{res.path}.{key}" if res.path else f"_.{key}"
        choices = None
        if isinstance(model, dict):
            child = model["pathsDefinedElsewhere"].get(child, child)
            choices = model["choiceTypePaths"].get(child)
        data = res.data
        value = extra = None
        if isinstance(data, FP_Quantity):
            value = data.value
        if choices and isinstance(data, Mapping):
            for choice in choices:
                value, extra = data.get(key + choice), data.get("_" + key + choice)
                if value is not None or extra is not None:
                    child += choice
                    break
        elif isinstance(data, Mapping):
            value, extra = data.get(key), data.get("_" + key)
            if key == "extension":
                child = "Extension"
        elif key == "length":
            value = len(data)
        elif not isinstance(data, FP_Quantity):
            value = twin_member(res, key)
            if key == "extension":
                child = "Extension"
        if isinstance(model, dict) and "path2Type" in model:
            child = model["path2Type"].get(child, child)
        add_element(acc, value, extra, child)
        return acc

    return reduce


def _extension(ctx: Ctx, data: list[Any], url: str) -> list[Any]:
    """fhirpathpy's extension(url) (the first extension with that url, per element), reading a
    primitive's extensions in its twin (add_element)."""
    found = []
    for item in data:
        element = util.get_data(item)
        if not isinstance(element, Mapping):
            element = getattr(item, "_data", None)
        if isinstance(element, Mapping):
            matching = [e for e in element.get("extension", []) if e["url"] == url]
            if matching:
                found.append(ResourceNode.create_node(matching[0], "Extension"))
    return found


def _install() -> None:
    """The two changes above, made once in fhirpathpy itself, so the interpreted form (rules/fhirpath.py)
    and the compiled one navigate alike; another fhirpathpy version is left as it is."""
    import fhirpathpy

    evaluators: Any = ev
    if fhirpathpy.__version__ != FHIRPATHPY_VERSION or getattr(evaluators, "nudges_elements", False):
        return
    evaluators.create_reduce_member_invocation = _member_reduction
    invocation_registry["extension"]["fn"] = _extension
    evaluators.nudges_elements = True


_install()


# -- would after util.arraify, handing anything but the common cases to that function.

def _and(ctx: Ctx, a: Any, b: Any) -> list[Any]:
    """logic.and_op on what its parameters can be (True, False, or [] for empty), arraified."""
    if a is False or b is False:
        return [False]
    return [True] if a is True and b is True else []


def _or(ctx: Ctx, a: Any, b: Any) -> list[Any]:
    """logic.or_op likewise."""
    if a is True or b is True:
        return [True]
    return [False] if a is False and b is False else []


def _plain(v: Any) -> bool:
    """Whether fhirpathpy's equality reduces to Python's == on the data: not a date/time literal, not a
    node typed Quantity (parse_value turns those into FP_Quantity)."""
    if isinstance(v, ResourceNode):
        return type(v.data) in _PLAIN and v.path not in ("Quantity", "System.Quantity")
    return type(v) in _PLAIN


def _equal(ctx: Ctx, x: list[Any], y: list[Any]) -> list[Any]:
    a, b = x[0], y[0]
    if _plain(a) and _plain(b):
        if len(x) != len(y):
            return [False]
        return [(a.data if isinstance(a, ResourceNode) else a) == (b.data if isinstance(b, ResourceNode) else b)]
    return _arraify(equality(ctx, x, y))


def _unequal(ctx: Ctx, x: list[Any], y: list[Any]) -> list[Any]:
    same = _equal(ctx, x, y)
    return [not same[0]] if same else []


def _valid_date(text: str) -> bool:
    if not _FULL_DATE.fullmatch(text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:  # 2023-02-29: fhirpathpy's parser raises, let it
        return False
    return True


def _full_date(v: Any) -> str | None:
    """The text of a valid full date (an FP_DateTime of one, or a string), else None."""
    text = v.asStr if type(v) is FP_DateTime else v if type(v) is str else None
    return text if text is not None and _is_full_date(text) else None


def _comparison(fallback: Callable[[Ctx, list[Any], list[Any]], Any],
                test: Callable[[Any, Any], bool]) -> Callable[[Ctx, list[Any], list[Any]], list[Any]]:
    """equality.lt and friends on one number, one string or one full date (YYYY-MM-DD) each side; the
    rest (times, partial dates, several items, mismatched types that raise) through fhirpathpy.

    Two full dates: equality.typecheck makes a string beside a date a date too, FP_TimeBase.compare
    sees equal precisions and orders their local-midnight timestamps, which is the order of the text."""

    def compare(ctx: Ctx, a: list[Any], b: list[Any]) -> list[Any]:
        if len(a) == 1 and len(b) == 1:
            x, y = util.get_data(a[0]), util.get_data(b[0])
            kx, ky = type(x), type(y)
            if (kx in _NUMBER and ky in _NUMBER) or (kx is str and ky is str):
                return [test(x, y)]
            if kx is FP_DateTime or ky is FP_DateTime:
                dx, dy = _full_date(x), _full_date(y)
                if dx is not None and dy is not None:
                    return [test(dx, dy)]
        return _arraify(fallback(ctx, a, b))

    return compare


def _memo(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A bounded memo for pure functions of immutable keys (fhirpathpy never mutates its FP values)."""
    seen: dict[Any, Any] = {}

    def get(key: Any) -> Any:
        try:
            return seen[key]
        except KeyError:
            if len(seen) >= _MEMO_SIZE:
                seen.clear()
            found = seen[key] = fn(key)
            return found

    return get


_as_date = _memo(FP_DateTime)
_is_full_date = _memo(_valid_date)  # toDate()/toDateTime() of a string: the same FP_DateTime every time


def _to_date(ctx: Ctx, coll: list[Any]) -> list[Any]:
    """misc.to_date (= to_date_time): one string or date to an FP_DateTime."""
    if len(coll) == 1:
        value = util.get_data(coll[0])
        if type(value) is str:
            return _arraify(_as_date(value))
    return _arraify(invocation_registry["toDate"]["fn"](ctx, coll))


def _date_arithmetic(fallback: Callable[[Ctx, list[Any], list[Any]], Any], sign: int) -> Callable[..., list[Any]]:
    """math.plus / math.minus; a date (literal or toDate()) and a quantity, as in `%today.toDate() - 28 days`,
    remembered by value (FP_TimeBase.plus parses and formats dates: the slow part of such a rule)."""

    def shift(key: tuple[str, Any, Any]) -> Any:
        text, value, unit = key
        return FP_DateTime(text).plus(FP_Quantity(value, unit))

    shifted = _memo(shift)

    def arithmetic(ctx: Ctx, a: list[Any], b: list[Any]) -> list[Any]:
        if len(a) == 1 and len(b) == 1 and type(a[0]) is FP_DateTime and type(b[0]) is FP_Quantity:
            q = b[0]
            return _arraify(shifted((a[0].asStr, q.value if sign > 0 else -q.value, q.unit)))
        return _arraify(fallback(ctx, a, b))

    return arithmetic


def _union(ctx: Ctx, a: list[Any], b: list[Any]) -> list[Any]:
    """combining.union_op = existence.distinct_fn(a + b). Nodes come out as new untyped nodes of their
    data; strings dedupe by value (as their JSON text would); anything else through fhirpathpy."""
    x = a + b
    if not x:
        return []
    if all(isinstance(v, ResourceNode) for v in x):
        data = [v.data for v in x]
        if len(data) == 1:
            return [_Node(data[0], None)]
        if all(type(d) is str for d in data):
            return [_Node(d, None) for d in dict.fromkeys(data)]
    elif all(type(v) is str for v in x):
        return list(dict.fromkeys(x))
    return _arraify(distinct_fn(ctx, x))


def _member_in(keys: frozenset[Any] | None) -> Callable[[Ctx, list[Any], list[Any]], list[Any]]:
    """collections.inn; with a literal right-hand side of plain values, a set look-up (Python's == and
    hash agree on str, int, bool, float and Decimal, as the loop's == would)."""

    def member(ctx: Ctx, a: list[Any], b: list[Any]) -> list[Any]:
        if keys is not None and len(a) == 1 and b:
            v = a[0]
            d = v.data if isinstance(v, ResourceNode) else v
            if type(d) in _HASHABLE:
                return [d in keys]
        return _arraify(inn(ctx, a, b))

    return member


def _type_test(spec: TypeInfo) -> Callable[[Any], bool]:
    """TypeInfo.from_value(v).is_(spec), remembered per node type while the global TypeInfo.model (which
    fhirpathpy's own `is`/`as` set) stays the same: with a model, a node's type depends on its path only."""
    memo: dict[str, bool] = {}
    state: list[Any] = [None]

    def test(v: Any) -> bool:
        model = Types.model
        if not model or not isinstance(v, ResourceNode) or type(v.path) is not str:
            return bool(TypeInfo.from_value(v).is_(spec))
        if state[0] is not model:
            memo.clear()
            state[0] = model
        path = v.path
        found = memo.get(path)
        if found is None:
            found = memo[path] = bool(TypeInfo.from_value(v).is_(spec))
        return found

    return test


def _not(ctx: Ctx, x: list[Any]) -> list[Any]:
    """existence.not_fn: a boolean singleton negated; any other singleton counts as true."""
    if len(x) != 1:
        return []
    data = util.get_data(x[0])
    return [not data] if isinstance(data, bool) else [False]


_NATIVE_FUNCTIONS: dict[str, Eval] = {
    "toDate": _to_date,
    "toDateTime": _to_date,
    "empty": lambda ctx, focus: [not focus],
    "count": lambda ctx, focus: [len(focus)],
    "first": lambda ctx, focus: _arraify(focus[0]) if focus else [],
    "not": _not,
}


def _output(value: Any) -> Any:
    """The `visit` at the end of fhirpathpy's apply_parsed_path: unwrap nodes, floats to Decimal (as
    util.get_data), copy dicts, and drop extension-only objects (primitive extensions) from lists."""
    data = util.get_data(value)
    if isinstance(value, list):
        out = []
        for item in data:
            got = _output(item)
            if isinstance(got, dict) and list(got.keys()) == ["extension"]:
                continue
            out.append(got)
        return out
    if isinstance(data, dict) and not isinstance(data, FP_Type):
        return {key: _output(v) for key, v in data.items()}
    return data


def _result(values: list[Any]) -> list[Any]:
    for v in values:
        if not (v is True or v is False or type(v) is str or type(v) is int):
            out: list[Any] = _output(values)
            return out
    return list(values)

