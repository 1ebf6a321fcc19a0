"""What a `where` compared on a resource, and which of its parts did not hold: `nudges explain`'s account
of a resource a clause's FHIRPath excluded, read off the expression's text (its top-level joins and
comparisons) and evaluated part by part on that resource."""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

from ..rules.fhirpath import compile_expression, truthy

COMPARISONS = ("<=", ">=", "!=", "!~", "=", "~", "<", ">")
JOINS = re.compile(r"\s(?:and|or|xor|implies)\s")
LITERAL = re.compile(r"^(?:-?\d+(?:\.\d+)?(?:\s*'[^']*')?|'(?:[^'\\]|\\.)*'|@[\dT:.+\-Z]+|true|false)$")
MAX_VALUE = 80


def _top_level(expression: str) -> set[int]:
    """Positions in `expression` outside parentheses, brackets and quoted strings."""
    found, depth, quote, i = set(), 0, "", 0
    while i < len(expression):
        char = expression[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'`\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            found.add(i)
        i += 1
    return found


def comparisons(expression: str) -> list[tuple[str, str, str]]:
    """(left, operator, right) of each comparison that `and`/`or`/`xor`/`implies` join at the top level
    of an expression: what an author wants to see the values of when `where` did not hold."""
    top = _top_level(expression)
    parts, start = [], 0
    for join in JOINS.finditer(expression):
        if join.start() in top:
            parts.append((start, expression[start:join.start()]))
            start = join.end()
    parts.append((start, expression[start:]))
    found = []
    for offset, part in parts:
        inner = part.strip()
        if _encloses(inner):  # a parenthesised group: the comparisons inside it
            found += comparisons(inner[1:-1])
            continue
        for i in sorted(p - offset for p in top if offset <= p < offset + len(part)):
            operator = next((op for op in COMPARISONS if part.startswith(op, i)), None)
            if operator is not None:
                left, right = part[:i].strip(), part[i + len(operator):].strip()
                if left and right:
                    found.append((left, operator, right))
                break
    return found


def failing_part(expression: str | None, resource: dict[str, Any], env: dict[str, Any]) -> str | None:
    """The first of a `where`'s top-level `and` parts that is not true on this resource: the part that
    excluded it, where the comparisons alone may show one that held (`status = ["completed"]`). None when
    the parts are joined otherwise, or one cannot be evaluated on its own."""
    if not expression:
        return None
    top = _top_level(expression)
    joins = [j for j in JOINS.finditer(expression) if j.start() in top]
    if not joins or any(j.group().strip() != "and" for j in joins):
        return None
    edges = [0, *(p for j in joins for p in (j.start(), j.end())), len(expression)]
    for part in (expression[a:b].strip() for a, b in zip(edges[::2], edges[1::2], strict=True)):
        try:
            held = truthy(_operand(part, resource.get("resourceType"))(resource, env))
        except Exception:  # a part that needs its context (or a value set): no verdict
            return None
        if not held:
            return part
    return None


def shorten(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _encloses(text: str) -> bool:
    """Whether the parenthesis that opens `text` is the one that closes it: `(a or b)`, not `(a) or (b)`."""
    return text.startswith("(") and text.endswith(")") and not _top_level(text)


@functools.lru_cache(maxsize=256)
def _operand(expression: str, resource_type: str | None) -> Any:
    return compile_expression(expression, resource_type)


def where_values(expression: str | None, resource: dict[str, Any], env: dict[str, Any]) -> str:
    """The values the comparisons of a `where` compared on this resource, e.g. "(value as Quantity).value
    = [20]; referenceRange.high.value = [34]" (a side that is a literal, or that cannot be evaluated on
    its own, such as a memberOf whose value set is not at hand, is left out)."""
    if not expression:
        return ""
    shown: list[str] = []
    for left, _, right in comparisons(expression):
        for side in (left, right):
            if LITERAL.match(side) or any(side == s.split(" = ")[0] for s in shown):
                continue
            try:
                value = _operand(side, resource.get("resourceType"))(resource, env)
            except Exception:  # a side that needs its context (or a value set) is skipped
                continue
            text = orjson.dumps(value, default=str).decode()
            shown.append(f"{side} = {text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 1] + '…'}")
    return "; ".join(shown)
