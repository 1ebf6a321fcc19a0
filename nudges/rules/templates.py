"""Card text templates: placeholders ({{name.field}}) and Mustache-style sections ({{#name}}..{{/name}}).

Checked at load against the names a rule binds, so a card can never render an unknown placeholder.
"""

from __future__ import annotations

import re

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



def template_problems(text: str, certain: set[str], seen: set[str]) -> list[str]:
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
            problems.append(f"unknown placeholder '{{{{{name}}}}}'")
    problems += [f"section '{{{{{k}{s}}}}}' is never closed with '{{{{/{s}}}}}'" for k, s in stack]
    return problems


def known_placeholder(name: str, bound: set[str]) -> bool:
    if name in FIXED_PLACEHOLDERS:
        return True
    head, _, tail = name.partition(".")
    return head in bound and tail in BINDING_FIELDS
