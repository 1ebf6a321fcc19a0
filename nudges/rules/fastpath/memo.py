"""`where` answers remembered by the content they read, across calls and patients.

Why: a health system's records repeat themselves. Thousands of Encounters carry the same status, class,
type and location; thousands of Conditions the same code and clinical status. The costliest `where`
clauses of the catalog (a nursing-home stay read from an encounter's type, location and admit source; an
injury visit from its reason codes) ask the same question of the same few values over and over, and a
population screening asks it of every patient. A `where` that reads no rule-bound name depends only on
the elements of the resource it navigates and on a few call-wide scalars (%now, %today, %hook, the
context ids); its answer is remembered under exactly those (a 128-bit digest of their JSON), for as long
as the rule set is loaded.

Correctness rests on `reads`: the names an expression can read from the resource it is evaluated on. It
is conservative by construction: every member name anywhere in the expression counts (most only name
children of what a root name holds: harmless), and anything that could see the resource whole (`$this`
where it is the resource, `%context`, `%resource`, `%patient`, `children()`, `descendants()`, the
resource used as a value by an operator, a function it cannot vouch for) makes the expression
unremembered. tests/test_memo.py checks, for every shipped expression it accepts, that the answer on
every resource of the cases and fixtures is the same with every other element removed or changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from hashlib import blake2b
from typing import Any

import orjson
from fhirpathpy.engine.invocations import invocation_registry

from ..fhirpath import syntax_tree, truthy

# Call-wide scalars an expression may read: their values join the key.
SCALARS = frozenset({"now", "today", "hook", "patientId", "encounterId", "userId"})
# Functions that may take the resource itself as their input, and whether their output is still it.
_ON_ROOT = {"where": True, "ofType": True, "first": True, "last": True,
            "exists": False, "empty": False, "count": False, "all": False, "select": False, "iif": False,
            "extension": False}
_WHOLE = frozenset({"children", "descendants", "resolve"})  # read everything below their input
_STEPS = frozenset({"MemberInvocation", "FunctionInvocation", "ThisInvocation", "IndexInvocation",
                    "TotalInvocation"})


class Unsafe(Exception):
    """The expression may read the resource beyond named elements: its answers are not remembered."""


class Reads:
    """What one expression can read: member names (with their `_` twins and choice forms) and scalars."""

    __slots__ = ("names", "scalars")

    def __init__(self, names: frozenset[str], scalars: tuple[str, ...]) -> None:
        self.names, self.scalars = names, scalars

    def wants(self, key: str) -> bool:
        """Whether a resource's element is read: a name, its twin (`_name`), or a choice form (`valueQuantity`
        for `value`). A superset: `codeable` for `code` is read too, which costs a hit, never an answer."""
        base = key[1:] if key.startswith("_") else key
        return base in self.names or any(
            base.startswith(name) and len(base) > len(name) and base[len(name)].isupper() for name in self.names)


def reads(tree: dict[str, Any]) -> Reads | None:
    """The names and scalars a `where` expression (fhirpathpy's syntax tree) can read, or None when it may
    read more than named elements."""
    names: set[str] = {"resourceType"}
    scalars: set[str] = set()
    try:
        if _walk(tree["children"][0], True, names, scalars):
            raise Unsafe("the expression yields the resource itself")
    except (Unsafe, KeyError, IndexError, TypeError):
        return None
    return Reads(frozenset(names), tuple(sorted(scalars)))


def _walk(node: dict[str, Any], this_root: bool, names: set[str], scalars: set[str]) -> bool:
    """Record what the node reads; whether its value may be the resource itself. `this_root`: $this (the
    focus of a term, and the base of a function's plain parameters) is the resource."""
    kind = node["type"]
    children: list[dict[str, Any]] = node.get("children", [])
    if kind in ("TermExpression", "InvocationTerm", "ParenthesizedTerm"):
        first = children[0]
        if first["type"] in _STEPS:
            return _step(first, this_root, this_root, names, scalars)
        return _walk(first, this_root, names, scalars)
    if kind == "LiteralTerm":
        return False
    if kind == "ExternalConstantTerm":
        name = _identifier(children[0]["children"][0])
        if name == "ucum":
            return False
        if name not in SCALARS:  # %patient, %context, %resource, a rule's bound names
            raise Unsafe(f"%{name}")
        scalars.add(name)
        return False
    if kind == "InvocationExpression":
        focus_root = _walk(children[0], this_root, names, scalars)
        return _step(children[1], focus_root, this_root, names, scalars)
    # an operator: its operands are evaluated from $this; none may be the resource used as a value
    for child in children:
        if child["type"] == "TypeSpecifier":
            continue
        if _walk(child, this_root, names, scalars):
            raise Unsafe(f"the resource itself under {kind}")
    return False


def _step(node: dict[str, Any], focus_root: bool, this_root: bool, names: set[str], scalars: set[str]) -> bool:
    """One step of a path on a focus (`focus_root`: the focus is the resource); whether its value may be it."""
    kind = node["type"]
    if kind == "MemberInvocation":
        name = _identifier(node["children"][0])
        names.add(name)
        return focus_root and name[:1].isupper()  # `Encounter.status`: a type name filters the resource
    if kind == "ThisInvocation":
        if this_root:
            raise Unsafe("$this is the resource")
        return False
    if kind in ("IndexInvocation", "TotalInvocation"):
        return False
    if kind != "FunctionInvocation":
        raise Unsafe(kind)
    parts = node["children"][0]["children"]
    name = _identifier(parts[0])
    params: list[dict[str, Any]] = parts[1]["children"] if len(parts) > 1 and "children" in parts[1] else []
    if name in _WHOLE or (focus_root and name not in _ON_ROOT):
        raise Unsafe(f"{name}() on the resource")
    if name == "extension":
        names.add("extension")
    kinds = _parameter_kinds(name, len(params))
    for param, param_kind in zip(params, kinds, strict=True):
        if param_kind in ("TypeSpecifier", "Identifier"):
            continue
        # criteria see each item of the focus as $this; other parameters are evaluated from $this
        if _walk(param, focus_root if param_kind == "Expr" else this_root, names, scalars):
            raise Unsafe(f"the resource itself as a parameter of {name}()")
    return focus_root and _ON_ROOT[name]


def _parameter_kinds(name: str, count: int) -> list[Any]:
    if name == "memberOf":
        return ["String"] * count
    invocation: Any = invocation_registry.get(name)
    if invocation is None:
        raise Unsafe(name)
    if "variadic" in invocation:
        return [invocation["variadic"]] * count
    if count == 0:
        return []
    return list(invocation["arity"][count])


def _identifier(node: dict[str, Any]) -> str:
    text: str = node["terminalNodeText"][0]
    return text.strip("`")


class Memo:
    """The answers of one compiled `where` by the bytes of what it reads. Bounded; and switched off for an
    expression whose answers rarely repeat (one that reads a measured value or a date), where building
    keys would only cost. Either way the answer is the expression's own."""

    __slots__ = ("_answers", "_lookups", "_misses", "_wanted", "off", "reads", "where")

    # answers kept per expression, by a 128-bit digest of what was read (about 130 bytes each, so a full memo
    # holds about half a megabyte); cleared when full (a bound, not an eviction policy)
    LIMIT = 4_096
    WINDOW = 2_000  # lookups between checks of the hit rate
    FLOOR = 0.3  # below this share of hits the memo turns itself off for the rule set's lifetime

    def __init__(self, where: Callable[..., list[Any]], found: Reads) -> None:
        self.where, self.reads = where, found
        self._answers: dict[bytes, bool] = {}
        self._wanted: dict[str, bool] = {}
        self._lookups = self._misses = 0
        self.off = False

    def held(self, resource: Mapping[str, Any], env: Mapping[str, Any]) -> bool:
        """truthy(where(resource, env)), from memory when the same content was asked before."""
        key = None if self.off else self._key(resource, env)
        if key is None:
            return truthy(self.where(resource, env))
        held = self._answers.get(key)
        self._lookups += 1
        if held is None:
            held = truthy(self.where(resource, env))
            self._misses += 1
            if len(self._answers) >= self.LIMIT:
                self._answers.clear()
            self._answers[key] = held
        if self._lookups >= self.WINDOW:
            self.off = self._misses > (1 - self.FLOOR) * self._lookups
            self._lookups = self._misses = 0
        return held

    def _key(self, resource: Mapping[str, Any], env: Mapping[str, Any]) -> bytes | None:
        """The digest of what the expression reads of this resource and call; None for what is not plain JSON."""
        wanted = self._wanted
        try:
            parts = [(k, v) for k, v in resource.items() if (wanted[k] if k in wanted else self._learn(k))]
            read = orjson.dumps((parts, [env.get(name) for name in self.reads.scalars]))
        except (TypeError, AttributeError):
            return None
        return blake2b(read, digest_size=16).digest()

    def _learn(self, key: str) -> bool:
        wanted = self.reads.wants(key) if isinstance(key, str) else True
        if len(self._wanted) < NAMES_LIMIT:  # element names are a small vocabulary; a hostile body's are not
            self._wanted[key] = wanted
        return wanted


NAMES_LIMIT = 2_048  # element names a memo remembers the decision on


def memo_for(settled: str | None, where: Callable[..., list[Any]] | None) -> Memo | None:
    """A memo for a compiled `where` whose text is shared call-wide (fhirpath.shared_text), when its reads
    can be named."""
    if settled is None or where is None:
        return None
    found = reads(syntax_tree(settled))
    return None if found is None else Memo(where, found)
