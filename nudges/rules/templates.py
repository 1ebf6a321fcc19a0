"""Card text templates: placeholders ({{name.field}}) and Mustache-style sections ({{#name}}..{{/name}}).

Checked at load against the names a rule binds, so a card can never render an unknown placeholder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

from .cache import keep

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")
# Sections in card text: {{#name}}...{{/name}} only when `name` was bound in this match, {{^name}}...{{/name}}
# only when it was not (Mustache's syntax, for names bound under `any`).
SECTION = re.compile(r"\{\{\s*([#^/])\s*([a-z][a-z0-9_]*)\s*\}\}")
TEMPLATE_TOKEN = re.compile(f"{SECTION.pattern}|{PLACEHOLDER.pattern}")
BINDING_FIELDS = {"elapsed", "date", "display", "value", "id", "reference"}
FIXED_PLACEHOLDERS = {"context.patientId", "context.userId", "context.encounterId", "now", "today",
                      "patient.age", "patient.reference"}
SAMPLE = {"context.patientId": "example", "context.userId": "Practitioner/example",
          "context.encounterId": "example", "now": "2000-01-01T00:00:00Z", "today": "2000-01-01",
          "patient.age": "50", "patient.reference": "Patient/example"}



def template_problems(text: str, certain: set[str], seen: Collection[str]) -> list[str]:
    """Placeholders must name something bound whenever they render: a name bound only sometimes (under
    `any`) inside its own {{#name}} section; sections must be about bound names and properly closed."""
    problems, stack = [], []
    for match in TEMPLATE_TOKEN.finditer(text):
        kind, section, name = match.group(1), match.group(2), match.group(3)
        if kind in ("#", "^"):
            if section not in seen:
                problems.append(f"section '{{{{{kind}{section}}}}}' is about '{section}', which no clause binds")
            stack.append((kind, section))
        elif kind == "/":
            if not stack or stack[-1][1] != section:
                problems.append(f"'{{{{/{section}}}}}' closes no open section")
            else:
                stack.pop()
        elif not known_placeholder(name, certain | {s for k, s in stack if k == "#"}):
            head = name.partition(".")[0]
            if ("^", head) in stack:
                problems.append(f"'{{{{{name}}}}}' inside {{{{^{head}}}}}, where '{head}' is not bound: move it out")
            elif head in seen and known_placeholder(name, {head}):
                problems.append(f"'{{{{{name}}}}}': '{head}' is bound only sometimes (under `any`): put it inside "
                                f"{{{{#{head}}}}}...{{{{/{head}}}}}, shown when it is bound")
            else:
                problems.append(f"unknown placeholder '{{{{{name}}}}}'")
    problems += [f"section '{{{{{k}{s}}}}}' is never closed with '{{{{/{s}}}}}'" for k, s in stack]
    return problems


def known_placeholder(name: str, bound: set[str]) -> bool:
    if name in FIXED_PLACEHOLDERS:
        return True
    head, _, tail = name.partition(".")
    return head in bound and tail in BINDING_FIELDS


# -- rendering plans ------------------------------------------------------------------------------------
# A card's text is rendered on every call that raises it; the regular expressions run once per template (and
# per combination of its sections' names bound or not) instead, and a call only joins literal pieces with
# values (a third of a card's cost on a small record, README "Performance"). Templates come from the loaded
# rule sets, so the caches hold a few hundred entries; they are emptied past PLAN_CACHE (rules reloaded
# many times over), never evicted one by one.
PLAN_CACHE = 4096
_sections: dict[str, tuple[str, ...]] = {}
_shown: dict[tuple[str, tuple[bool, ...]], str] = {}
_pieces: dict[str, tuple[str, ...]] = {}


def _remember(memory: dict[Any, Any], key: Any, value: Any) -> Any:
    return keep(memory, key, value, PLAN_CACHE)


def pieces(text: str) -> tuple[str, ...]:
    """`text` split at its placeholders: literal text at even positions, a placeholder's name at odd ones."""
    found = _pieces.get(text)
    return found if found is not None else _remember(_pieces, text, tuple(PLACEHOLDER.split(text)))


def shown_sections(template: str, bound: Callable[[str], bool]) -> str:
    """The template with {{#name}} sections kept when `bound(name)`, {{^name}} ones when not (Mustache's
    rules; an unmatched close tag is dropped, an unclosed section runs to the end)."""
    names = _sections.get(template)
    if names is None:
        names = _remember(_sections, template, tuple(dict.fromkeys(m.group(2) for m in SECTION.finditer(template))))
    if not names:
        return template
    held = tuple(bound(name) for name in names)
    found = _shown.get((template, held))
    if found is None:
        found = _remember(_shown, (template, held), _cut_sections(template, dict(zip(names, held, strict=True))))
    return found


def _cut_sections(template: str, bound: dict[str, bool]) -> str:
    out: list[str] = []
    stack: list[bool] = []
    showing, position = True, 0
    for token in SECTION.finditer(template):
        if showing:
            out.append(template[position:token.start()])
        position = token.end()
        kind, name = token.groups()
        if kind == "/":
            showing = stack.pop() if stack else showing
        else:
            stack.append(showing)
            showing = showing and (bound[name] == (kind == "#"))
    if showing:
        out.append(template[position:])
    return "".join(out)
