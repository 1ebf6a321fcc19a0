"""Compiled FHIRPath for nudges rules: the same FHIRPath text, translated once into Python closures.

Why: profiling population screening shows most of the time inside fhirpathpy's tree-walking
interpreter (a dict dispatch per AST node, the function registry merged per call, parameter plumbing
re-derived on every evaluation, a JSON dump per item of every union). So this keeps fhirpathpy's parser,
its node objects and its implementation of every function, and removes the interpretation: each AST
node becomes a closure, with names, arities, parameter kinds, literals and type specifiers resolved at
compile time and literal-only subexpressions evaluated once. The hot operations (member navigation,
`where`, `exists`, `=`, comparisons, `|`, `in`, type tests, `not`, `empty`, `count`, `first`) run
natively on their common inputs (ops.py); anything less common is handed to fhirpathpy's own function.

Results equal fhirpathpy's, errors included (the same exception type where fhirpathpy raises), for the
model given at compile time (R4). `compile_fast` returns None for anything outside the subset (see
SUPPORTED_FUNCTIONS and `_Compiler.translate`); the caller then uses fhirpathpy. tests/test_fastpath.py
checks both agree on every shipped expression over the fixtures and on the official FHIRPath tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import fhirpathpy
from fhirpathpy.engine import type_specifier, util
from fhirpathpy.engine.invocations.constants import constants
from fhirpathpy.engine.invocations.equality import gt, gte, lt, lte
from fhirpathpy.engine.invocations.math import minus, plus
from fhirpathpy.engine.nodes import FP_Quantity, ResourceNode

from .ops import (
    _ALIAS,
    _CHECKS,
    _CLOCK,
    _HASHABLE,
    _LITERALS,
    _NATIVE_FUNCTIONS,
    _OPERATORS,
    _PASS_THROUGH,
    _UCUM,
    FHIRPATHPY_VERSION,
    R4,
    SUPPORTED_FUNCTIONS,
    Compiled,
    Ctx,
    Eval,
    Maker,
    Types,
    Unsupported,
    ValueSets,
    _and,
    _arraify,
    _comparison,
    _date_arithmetic,
    _empty,
    _equal,
    _member_in,
    _Node,
    _or,
    _Plan,
    _result,
    _type_test,
    _unequal,
    _union,
    add_element,
    ev,
    invocation_registry,
    twin_member,
)

__all__ = ["SUPPORTED_FUNCTIONS", "compile_fast"]

class _Compiler:
    """Translates fhirpathpy's AST (plain dicts from fhirpathpy.parser.parse) into closures."""

    def __init__(self, model: dict[str, Any] | None, valuesets: ValueSets,
                 member: Callable[[list[Any], str], list[bool]]) -> None:
        self.model = model
        self.valuesets = valuesets
        # as process_user_invocation_table: a user function gets the unwrapped data of its inputs
        self.registry: dict[str, dict[str, Any]] = {**invocation_registry, "memberOf": {
            "fn": lambda ctx, inputs, *args: member([util.get_data(i) for i in inputs], *args),
            "arity": {1: ["String"]}}}
        self.uses_clock = False
        self.done: dict[int, Eval] = {}  # by AST node: folding and `in` look at subtrees again

    def compile(self, node: dict[str, Any]) -> Eval:
        found = self.done.get(id(node))
        if found is None:
            found = self.done[id(node)] = self.translate(node)
        return found

    def translate(self, node: dict[str, Any]) -> Eval:
        kind = node["type"]
        children: list[dict[str, Any]] = node.get("children", [])
        if kind in _PASS_THROUGH:
            return self.compile(children[0])
        if kind in _LITERALS:
            try:
                values = _LITERALS[kind](None, None, node)
            except Exception as exc:
                raise Unsupported(kind) from exc
            return lambda ctx, focus: list(values)
        if kind == "ExternalConstantTerm":
            return self.constant(ev.identifier(None, None, children[0]["children"][0])[0].replace("`", ""))
        if kind == "InvocationExpression":
            return self.chain([self.compile(c) for c in children])
        if kind == "MemberInvocation":
            return self.member(ev.identifier(None, None, children[0])[0].replace("`", ""))
        if kind == "FunctionInvocation":
            return self.function(children[0])
        if kind in ("ThisInvocation", "IndexInvocation", "TotalInvocation"):
            name = {"ThisInvocation": "$this", "IndexInvocation": "$index", "TotalInvocation": "$total"}[kind]
            return lambda ctx, focus: _arraify(ctx[name])
        if kind in _OPERATORS or kind in _ALIAS:
            op = node["terminalNodeText"][0]
            if kind in _ALIAS:
                if op not in _ALIAS[kind]:
                    raise Unsupported(op)
                op = _ALIAS[kind][op]
            return self.folded(node) or self.infix(op, children)
        if kind == "PolarityExpression":
            return self.polarity(node["terminalNodeText"][0], self.compile(children[0]))
        if kind == "IndexerExpression":
            return self.indexer(self.compile(children[0]), self.compile(children[1]))
        raise Unsupported(kind)  # whatever a later grammar adds

    def folded(self, node: dict[str, Any]) -> Eval | None:
        """An operator over literals only, such as ('18867' | '1998' | ...), evaluated once. The one trace
        fhirpathpy's evaluation leaves is $this set to the operator's focus (make_param): kept."""
        if not _literal_only(node):
            return None
        try:
            op = node["terminalNodeText"][0]
            if node["type"] in _ALIAS:
                op = _ALIAS[node["type"]][op]
            values = self.infix(op, node["children"])({"dataRoot": [], "model": self.model, "env": {}}, [])
        except Exception:
            return None

        def constant(ctx: Ctx, focus: list[Any]) -> list[Any]:
            ctx["$this"] = focus
            return list(values)

        constant.values = values  # type: ignore[attr-defined]  # read by infix for `in`
        return constant

    @staticmethod
    def constant(name: str) -> Eval:
        """%name: the caller's environment first, then fhirpathpy's own %context and %ucum."""

        def lookup(ctx: Ctx, focus: list[Any]) -> list[Any]:
            env = ctx["env"]
            if name in env:
                value = env[name]
            elif name == "context":
                value = ctx["resource"]
            elif name == "ucum":
                value = _UCUM
            else:
                raise ValueError(f"Attempting to access an undefined environment variable: {name}")
            return [] if value is None else value if isinstance(value, list) else [value]

        return lookup

    @staticmethod
    def chain(steps: list[Eval]) -> Eval:
        """a.b.c: each step on the previous one's result; the final copy is fhirpathpy's (unary minus
        negates in place, so which lists are shared is part of the semantics)."""
        first, rest = steps[0], steps[1:]
        if len(rest) == 1:
            second = rest[0]
            return lambda ctx, focus: list(second(ctx, first(ctx, focus)))

        def run(ctx: Ctx, focus: list[Any]) -> list[Any]:
            acc = first(ctx, focus)
            for step in rest:
                acc = step(ctx, acc)
            return list(acc)

        return run

    @staticmethod
    def polarity(sign: str, body: Eval) -> Eval:
        """evaluators.polarity_expression, in-place negation included."""

        def negate(ctx: Ctx, focus: list[Any]) -> list[Any]:
            rtn = body(ctx, focus)
            if len(rtn) != 1:
                raise Exception("Unary " + sign + " can only be applied to an individual number.")
            if not util.is_number(rtn[0]):
                raise Exception("Unary " + sign + " can only be applied to a number.")
            if sign == "-":
                rtn[0] = -rtn[0]
            return rtn

        return negate

    @staticmethod
    def indexer(coll_of: Eval, idx_of: Eval) -> Eval:
        def index(ctx: Ctx, focus: list[Any]) -> list[Any]:
            coll = coll_of(ctx, focus)
            idx = idx_of(ctx, focus)
            if not idx:
                return []
            n = int(idx[0])
            return [coll[n]] if len(coll) > n >= 0 else []

        return index

    def typed(self, path: str) -> str:
        model = self.model
        if isinstance(model, dict) and "path2Type" in model:
            found: str = model["path2Type"].get(path, path)
            return found
        return path

    def member(self, key: str) -> Eval:
        """evaluators.member_invocation and create_reduce_member_invocation, with the model look-ups
        (paths defined elsewhere, choice types, element types) done once per parent type."""
        model = self.model
        capitalized = util.is_capitalized(key)
        underscored = "_" + key
        plans: dict[str, _Plan] = {}

        def plan(path: Any, keep: bool = True) -> _Plan:
            child = f"{path}.{key}" if path else f"_.{key}"
            choices = None
            if isinstance(model, dict):
                child = model["pathsDefinedElsewhere"].get(child, child)
                actual = model["choiceTypePaths"].get(child)
                if actual:
                    choices = [(key + t, "_" + key + t, self.typed(child + t)) for t in actual]
            found = (choices, self.typed(child), self.typed("Extension" if key == "extension" else child))
            if keep:
                plans[path] = found
            return found

        def navigate(ctx: Ctx, focus: list[Any]) -> list[Any]:
            if capitalized:  # a resource type filters the resources in focus (nodes: TypeError, then a field)
                try:
                    return [ResourceNode.create_node(x, key) for x in [x for x in focus if x["resourceType"] == key]]
                except TypeError:
                    pass
            acc: list[Any] = []
            for res in focus:
                if not isinstance(res, ResourceNode):
                    res = _Node(res, None)
                data = res.data
                path = res.path
                if type(path) is str:
                    choices, child, in_mapping = plans.get(path) or plan(path)
                else:  # None, or whatever a malformed resourceType holds
                    choices, child, in_mapping = plan(path, keep=False)
                if type(data) is dict and choices is None:  # the common case, in short
                    value = data.get(key)
                    if underscored in data:  # with its twin (add_element)
                        add_element(acc, value, data[underscored], in_mapping)
                    elif value is not None:
                        if type(value) is list:
                            acc += [x if isinstance(x, ResourceNode) else _Node(x, in_mapping) for x in value]
                        else:
                            acc.append(value if isinstance(value, ResourceNode) else _Node(value, in_mapping))
                    continue
                value = extra = None
                if isinstance(data, FP_Quantity):
                    value = data.value
                if choices is not None and isinstance(data, Mapping):
                    for field, field_, typed in choices:
                        value = data.get(field)
                        extra = data.get(field_)
                        if value is not None or extra is not None:
                            child = typed
                            break
                elif isinstance(data, Mapping):
                    value = data.get(key)
                    extra = data.get(underscored)
                    child = in_mapping
                elif key == "length":
                    value = len(data)
                elif not isinstance(data, FP_Quantity):  # a primitive: its twin's members (add_element)
                    value = twin_member(res, key)
                    child = in_mapping
                add_element(acc, value, extra, child)
            return acc

        return navigate

    def maker(self, kind: Any, param: dict[str, Any]) -> Maker:
        """engine.make_param, resolved at compile time. Its side effect is reproduced on purpose: every
        parameter but a criteria or a type sets $this to the parameter's base before it is evaluated,
        and fhirpathpy takes the base of a later function's parameters from $this."""
        if kind == "Expr":
            body = self.compile(param)

            def criteria(ctx: Ctx, base: list[Any]) -> Callable[[Any], list[Any]]:
                def func(data: Any) -> list[Any]:
                    this = ctx["$this"] = _arraify(data)
                    return body(ctx, this)

                return func

            return criteria
        if kind == "TypeSpecifier":
            try:
                spec = type_specifier(None, None, param)
            except Exception as exc:
                raise Unsupported("type specifier") from exc
            return lambda ctx, base: spec
        if kind == "Identifier":
            if param["type"] != "TermExpression":
                raise Unsupported("identifier parameter")
            text = param["text"]
            return lambda ctx, base: text
        body = self.compile(param)
        if kind == "AnyAtRoot":
            def at_root(ctx: Ctx, base: list[Any]) -> list[Any]:
                this = ctx["$this"] = ctx["$this"] if "$this" in ctx else ctx["dataRoot"]
                return body(ctx, this)

            return at_root
        if kind == "Any":
            def any_(ctx: Ctx, base: list[Any]) -> list[Any]:
                ctx["$this"] = base
                return body(ctx, base)

            return any_
        listed = isinstance(kind, list)
        name: str = kind[0] if listed else kind
        if name not in _CHECKS:
            raise Unsupported(f"parameter type {name}")
        check = _CHECKS[name]

        boolean = name == "Boolean"

        def checked(ctx: Ctx, base: list[Any]) -> Any:
            ctx["$this"] = base
            res = body(ctx, base)
            if len(res) == 1:
                if boolean:  # check_boolean_param's accepted values, without the call
                    v = res[0]
                    if v is True or v is False:
                        return v
                    if isinstance(v, ResourceNode) and (v.data is True or v.data is False):
                        return v.data
                return check(res[0])
            if len(res) > 1:
                raise Exception("Unexpected collection" + json.dumps(res) + "; expected singleton of type " + name)
            return []

        return checked

    def infix(self, op: str, operands: list[dict[str, Any]]) -> Eval:
        """engine.infix_invoke: both operands are always evaluated, left then right, from the same base,
        then the null check, then the operator."""
        invocation = self.registry.get(op)
        if invocation is None or "fn" not in invocation:
            raise Unsupported(op)
        left, right = (self.maker(t, p) for t, p in zip(invocation["arity"][2], operands, strict=True))
        fn = self.native_operator(op, operands) or (lambda ctx, a, b: _arraify(invocation["fn"](ctx, a, b)))
        if "nullable" in invocation:
            def nullable(ctx: Ctx, focus: list[Any]) -> list[Any]:
                a = left(ctx, focus)
                b = right(ctx, focus)
                if _empty(a) or _empty(b):
                    return []
                return fn(ctx, a, b)

            return nullable
        return lambda ctx, focus: fn(ctx, left(ctx, focus), right(ctx, focus))

    def native_operator(self, op: str, operands: list[dict[str, Any]]) -> Callable[..., list[Any]] | None:
        if op in ("and", "or"):
            return _and if op == "and" else _or
        if op in ("=", "!="):
            return _equal if op == "=" else _unequal
        if op in ("<", ">", "<=", ">="):
            tests: dict[str, tuple[Any, Callable[[Any, Any], bool]]] = {
                "<": (lt, lambda x, y: x < y), ">": (gt, lambda x, y: x > y),
                "<=": (lte, lambda x, y: x <= y), ">=": (gte, lambda x, y: x >= y)}
            return _comparison(*tests[op])
        if op == "|":
            return _union
        if op in ("+", "-"):
            return _date_arithmetic(plus, 1) if op == "+" else _date_arithmetic(minus, -1)
        if op == "inOp":
            right = self.compile(operands[1])
            values = getattr(right, "values", None)
            plain = values is not None and all(type(v) in _HASHABLE for v in values)
            return _member_in(frozenset(values) if plain and values else None)
        if op in ("isOp", "asOp"):
            test = _type_test(type_specifier(None, None, operands[1]))
            model = self.model

            def type_op(ctx: Ctx, coll: list[Any], spec: Any) -> list[Any]:
                Types.model = model  # as types.is_fn / as_fn do, on every call
                if not coll:
                    return []
                if len(coll) > 1:
                    raise ValueError(f"Expected singleton on left side of '{op[:2]}', got {coll}")
                return ([test(coll[0])] if op == "isOp" else coll if test(coll[0]) else [])

            return type_op
        return None

    def function(self, functn: dict[str, Any]) -> Eval:
        """engine.doInvoke, resolved at compile time: name, arity, parameter kinds and null checks."""
        parts = functn["children"]
        name = ev.identifier(None, None, parts[0])[0]
        raw: list[dict[str, Any]] = parts[1]["children"] if len(parts) > 1 and "children" in parts[1] else []
        if name not in SUPPORTED_FUNCTIONS or name not in self.registry:
            raise Unsupported(name)
        if name == "trace":
            raw = raw[:1]  # as doInvoke: the projection argument is ignored
        if name == "memberOf":
            self.check_value_set(raw)
        if name in _CLOCK:
            self.uses_clock = True
        invocation = self.registry[name]
        fn = invocation["fn"]
        nullable_input = "nullable_input" in invocation
        if "variadic" in invocation:
            makers = [self.maker(invocation["variadic"], p) for p in raw]
        elif "arity" not in invocation:
            if raw:
                raise Unsupported(f"{name} takes no parameters")
            return _NATIVE_FUNCTIONS.get(name) or (
                (lambda ctx, focus: [] if not focus else _arraify(fn(ctx, focus))) if nullable_input
                else (lambda ctx, focus: _arraify(fn(ctx, focus))))
        else:
            if len(raw) not in invocation["arity"]:
                raise Unsupported(f"{name} arity {len(raw)}")
            types = invocation["arity"][len(raw)]  # upper() and lower() declare a type for no parameter
            makers = [self.maker(types[i], p) for i, p in enumerate(raw)]
            if name in ("where", "exists") and raw:
                return self.where(self.compile(raw[0]), exists=name == "exists", twice=_reads_state(raw[0]))
            if name == "exists":
                return lambda ctx, focus: [len(focus) > 0]
            if name == "iif":
                return self.iif([self.compile(p) for p in raw])
            if name == "ofType":
                test = _type_test(type_specifier(None, None, raw[0]))
                return lambda ctx, focus: [v for v in focus if test(v)]
        nullable = "nullable" in invocation

        def call(ctx: Ctx, focus: list[Any]) -> list[Any]:
            if nullable_input and not focus:
                return []
            base = ctx["$this"] if "$this" in ctx else ctx["dataRoot"]
            params = [make(ctx, base) for make in makers]
            if nullable and (not focus or any(_empty(p) for p in params)):
                return []
            return _arraify(fn(ctx, focus, *params))

        return call

    def check_value_set(self, raw: list[dict[str, Any]]) -> None:
        """memberOf needs a quoted, known value set name, as nudges checks at load; otherwise fall back."""
        term = raw[0]["children"][0] if raw and raw[0]["type"] == "TermExpression" else None
        literal = term["children"][0] if term and term["type"] == "LiteralTerm" else None
        if not literal or literal["type"] != "StringLiteral":
            raise Unsupported("memberOf without a quoted value set name")
        if ev.string_literal(None, None, literal)[0] not in self.valuesets:
            raise Unsupported("memberOf with an unknown value set")

    @staticmethod
    def iif(bodies: list[Eval]) -> Eval:
        """misc.iif_macro: its three Expr parameters each see $this as the focus, and only the branch the
        criterion picks is evaluated. Native because rules date encounters by it (`date:` on every
        Encounter of every call), where the parameter plumbing cost more than the branches."""
        criterion, ok = bodies[0], bodies[1]
        otherwise = bodies[2] if len(bodies) > 2 else None

        def iif(ctx: Ctx, focus: list[Any]) -> list[Any]:
            this = ctx["$this"] = _arraify(focus)
            if util.is_true(criterion(ctx, this)):
                this = ctx["$this"] = _arraify(focus)
                return _arraify(ok(ctx, this))
            if otherwise is not None:
                this = ctx["$this"] = _arraify(focus)
                return _arraify(otherwise(ctx, this))
            return []

        return iif

    @staticmethod
    def where(body: Eval, *, exists: bool, twice: bool) -> Eval:
        """filtering.where_macro (and existence.exists_macro over it). fhirpathpy evaluates the criteria
        a second time when the first gave a value, and keeps the item by the second: the same value unless
        the first run changed what the criteria read ($index or $total from a nested function, the global
        model from an is/as), so only such criteria run twice here. An item is kept when that value is
        truthy in Python, as in fhirpathpy."""

        def where(ctx: Ctx, focus: list[Any]) -> list[Any]:
            kept = []
            for i, x in enumerate(focus):
                ctx["$index"] = i
                this = ctx["$this"] = _arraify(x)
                result = body(ctx, this)
                if twice and len(result) > 0:
                    this = ctx["$this"] = _arraify(x)
                    result = body(ctx, this)
                if len(result) > 0 and result[0]:  # every item is evaluated: a later one may raise
                    kept.append(x)
            if exists:
                return [len(kept) > 0]
            return [y for x in kept for y in (x if isinstance(x, list) else [x])]

        return where


def _reads_state(node: dict[str, Any]) -> bool:
    """Whether an expression reads state that evaluating it can change: $index, $total, or the model
    fhirpathpy's is/as set globally (which ofType and equality read)."""
    kind = node["type"]
    if kind in ("IndexInvocation", "TotalInvocation", "TypeExpression"):
        return True
    if kind == "Functn" and ev.identifier(None, None, node["children"][0])[0] in ("is", "as"):
        return True
    return any(_reads_state(c) for c in node.get("children", []))


def _literal_only(node: dict[str, Any]) -> bool:
    kind = node["type"]
    if kind in _LITERALS:
        return True
    if kind in _PASS_THROUGH or kind in _OPERATORS or kind == "MembershipExpression":
        return all(_literal_only(c) for c in node.get("children", []))
    return False


def compile_fast(tree: dict[str, Any], valuesets: ValueSets, member: Callable[[list[Any], str], list[bool]],
                 model: dict[str, Any] | None = R4) -> Compiled | None:
    """Compile fhirpathpy's syntax tree of an expression to a function (resource, environment) -> list, as
    fhirpathpy would evaluate it, with `member` as memberOf; None when it leaves the supported subset.

    The environment maps names to values for %name (nudges passes now, today, hook, the context ids and
    bound resources); as in fhirpathpy it overrides the built-in %context and %ucum."""
    if fhirpathpy.__version__ != FHIRPATHPY_VERSION:
        return None
    compiler = _Compiler(model, valuesets, member)
    try:
        root = compiler.compile(tree["children"][0])
    except Unsupported:
        return None
    clock = compiler.uses_clock

    def evaluate(resource: Any, env: Mapping[str, Any] | None = None) -> list[Any]:
        if clock:
            constants.reset()
        data_root = util.arraify(resource)
        ctx: Ctx = {"dataRoot": data_root, "model": model, "env": env or {}, "resource": resource}
        return _result(root(ctx, data_root))

    return evaluate
