"""YAML with positions: every problem an informaticist sees says path:line:column.

Parsing YAML with positions (ruamel's round-trip loader, pure Python) is most of the time a rule load
takes. A file's plain values are therefore cached by the hash of its bytes (rules/cache.py), and its
positions are parsed only when a problem needs one: an unchanged, clean file costs a JSON read.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.scalarstring import FoldedScalarString, LiteralScalarString

from . import cache
from .resources import did_you_mean
from .schema import UNION_TAGS

CACHE_FORMAT = b"nudges-yaml-1"


@dataclass(frozen=True, order=True)
class Problem:
    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


@dataclass
class Document:
    """One YAML file: its plain values (what models validate) and, parsed on demand, its positions."""

    text: str
    plain: Any
    _tree: Any = field(default=None, repr=False)

    @property
    def tree(self) -> Any:
        """The round-trip tree with line/column marks (parsed on first use when the plain values came
        from the cache), read only. Remembered in this process by the text: a rule set whose rules draw
        warnings (deliveries to pools this site has not configured) placed them by parsing those rules'
        files again at every load, 0.14 s a file, more than the rest of a warm load."""
        if self._tree is None:
            self._tree = _tree_of(self.text)
        return self._tree


_TREES: dict[bytes, Any] = {}
TREES_KEPT = 64  # a rule file's tree is a few hundred kB of ruamel objects


def _tree_of(text: str) -> Any:
    key = hashlib.sha256(text.encode()).digest()
    tree = _TREES.get(key)
    if tree is None:
        tree = cache.keep(_TREES, key, _parse(text), TREES_KEPT)  # a syntax error is raised, not remembered
    return tree


def _parse(text: str) -> Any:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    return yaml.load(text)


def load(path: Path, display: str, *, mapping: bool = True) -> tuple[Document | None, list[Problem]]:
    """Read and parse a file (a mapping, unless `mapping` is False); syntax errors become problems."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:  # read by every reload: a huge file would stall the service's reloads
            return None, [Problem(display, 1, 1, f"the file is {size / 2**20:.1f} MB, over the "
                                                 f"{MAX_FILE_BYTES // 2**20} MB a rule, case or value set file may "
                                                 "be: split it, or move bulk "
                                                 "data to a fixture")]
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        return None, [Problem(display, line, 1, "the file is not UTF-8 text (a byte the UTF-8 encoding does not "
                                                "allow): save it as UTF-8")]
    except OSError as exc:
        return None, [Problem(display, 1, 1, f"cannot read file: {exc}")]
    entry = cache.key("yaml", CACHE_FORMAT, raw)
    plain_values = cache.lookup(entry)
    if plain_values is None:
        try:
            tree = _tree_of(text)
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            return None, [Problem(display, line, col, advice(str(exc.problem or exc.context or "")))]
        try:
            document = Document(text, plain(tree, [MAX_VALUES]), tree)
        except TooManyValues:
            return None, [Problem(display, 1, 1, f"the file expands to more than {MAX_VALUES:,} values: an alias "
                                                 "(*name) repeats all its anchor (&name) holds, and aliases of "
                                                 "aliases multiply; write the values out or use fewer aliases")]
        cache.store(entry, document.plain)
    else:
        document = Document(text, plain_values)
    if mapping and not isinstance(document.plain, dict):
        what = "the file is empty" if document.plain is None else "the file is not a YAML mapping"
        return None, [Problem(display, 1, 1, f"{what}: it must be `key: value` lines (`nudges new rule` writes "
                                             "a rule to start from)")]
    return document, []


# The parser's words, and what to do about them.
ADVICE = (
    ("found duplicate key", "this key appears twice in the same mapping: keep one"),
    ("mapping values are not allowed here", "a ': ' inside a value: put the value in quotes"),
    ("found character '\\t'", "a tab character: YAML indents with spaces only"),
    ("could not find expected ':'", "a line that is not `key: value`: check the indentation or a missing colon"),
    ("expected ',' or ']'", "an unclosed [ list, or a ':' inside one: close it with ] or quote the item"),
    ("expected ',' or '}'", "an unclosed { mapping, or a stray character in one: close it with } or quote the value"),
    ("did not find expected key", "the indentation changes in the middle of a mapping: line the keys up"),
    ("did not find expected '-' indicator", "a list item not lined up with the others: indent it like the rest"),
    ("found unexpected end of stream", "a quote or bracket opened and never closed"),
    ("found undefined alias", "a *name with no &name anchor: quote the value if it starts with *"),
    ("found unknown escape character", "a backslash escape YAML does not know: use single quotes, or \\\\"),
    ("while scanning a quoted scalar", "a quoted value that is never closed"),
    ("found character '@'", "a value may not start with @ or `: put it in quotes"),
)


def advice(problem: str) -> str:
    for words, meaning in ADVICE:
        if words in problem:
            return f"YAML: {meaning} (the parser says: {problem.strip()})"
    return f"YAML syntax: {problem.strip()}"


def position(document: Document | Any, loc: Sequence[Any], *, value: bool = False,
             offset: int = 0) -> tuple[int, int]:
    """1-based line/column of the deepest node of `loc` that exists (the key, or its value); with `offset`,
    of that character of the value, found on its own line when the value is a block (`>-`, `|`)."""
    node = document.tree if isinstance(document, Document) else document
    line, col = 1, 1
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            pos = node.lc.value(part) if value and part == loc[-1] else node.lc.key(part)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            pos = node.lc.item(part)
            node = node[part]
        else:
            break
        if pos and pos[0] is not None:
            line, col = pos[0] + 1, pos[1] + 1
    if offset and isinstance(node, FoldedScalarString | LiteralScalarString) and isinstance(document, Document):
        return _in_block(document.text.splitlines(), line, offset) or (line, col + offset)
    return line, col + offset


def _in_block(lines: list[str], indicator_line: int, offset: int) -> tuple[int, int] | None:
    """Where character `offset` of a block scalar's text lies: its lines follow the indicator's line, each
    given back as the text's line (joined by one newline, or one space when folded)."""
    content = [(n, text) for n, text in enumerate(lines[indicator_line:], indicator_line + 1)]
    indent = next((len(t) - len(t.lstrip()) for _, t in content if t.strip()), 0)
    for n, text in content:
        if text.strip() and len(text) - len(text.lstrip()) < indent:
            break  # the block has ended
        body = text[indent:]
        if offset <= len(body):
            return n, indent + offset + 1
        offset -= len(body) + 1
    return None


def node_at(document: Document, loc: Sequence[Any]) -> Any:
    """The round-trip node at `loc` (scalar subclasses keep their quoting style), or None."""
    node = document.tree
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def validate(model: type[BaseModel], document: Document, display: str) -> tuple[Any, list[Problem]]:
    try:
        return model.model_validate(document.plain), []
    except ValidationError as exc:
        problems = []
        meant = set()  # (mapping, key) an unknown key was probably meant to be: not also reported missing
        for error in exc.errors():
            if error["type"] == "extra_forbidden":
                names = field_names(model, tuple(error["loc"][:-1]))
                close = difflib.get_close_matches(str(error["loc"][-1]), sorted(names), n=1, cutoff=0.6)
                meant |= {(tuple(error["loc"][:-1]), close[0])} if close else set()
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if p not in UNION_TAGS)
            line, col = position(document, loc)
            where = ".".join(str(p) for p in loc)
            kind = error["type"]
            if kind == "extra_forbidden":
                names = field_names(model, tuple(error["loc"][:-1]))
                message = f"unknown field '{loc[-1]}'{did_you_mean(str(loc[-1]), names)}"
            elif kind == "literal_error" and isinstance(error.get("input"), str):
                expected = re.findall(r"'([^']*)'", str((error.get("ctx") or {}).get("expected", "")))
                message = f"{where}: {error['msg']}{did_you_mean(error['input'], expected)}"
            elif kind == "missing":
                if (tuple(error["loc"][:-1]), error["loc"][-1]) in meant:
                    continue
                message = f"missing required field '{where}'"
            else:
                message = f"{where}: {error['msg']}{_how(kind, error.get('input'), loc)}" if where else error["msg"]
            problems.append(Problem(display, line, col, message))
        return None, problems


def _how(kind: str, given: Any, loc: tuple[Any, ...]) -> str:
    """What to write instead, where pydantic only says what is wrong (YAML reads `1.0` as a number)."""
    name = str(loc[-1]) if loc else ""
    if kind == "string_type" and isinstance(given, int | float) and not isinstance(given, bool):
        shown = str(given)
        if name == "version":
            return f": YAML read {shown} as a number; write the version as three numbers in quotes, \"1.0.0\""
        if name in DURATIONS:
            return f": YAML read {shown} as a number; give the unit, as in {shown}d, 12h, 30min or 6mo"
        return f": YAML read {shown} as a number; put it in quotes (\"{shown}\")"
    if kind == "string_pattern_mismatch" and name == "version":
        return ": a version is three numbers, major.minor.patch, as in \"1.0.0\""
    if kind == "list_type" and isinstance(given, str):
        return f": write it as a list, [{given}] (or one `- {given}` item a line)"
    return ""


# Fields whose values are durations (rules/schema.py Duration): a bare number there lacks its unit.
DURATIONS = frozenset({"within", "older_than", "suppress", "after", "lockout", "due"})


def field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str]:
    """The keys a rule-file mapping may have at `loc` (a validation error's location, union tags such as
    'Clause' included), for "did you mean"."""
    candidates: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int) or not candidates:
            continue
        if part in UNION_TAGS:
            candidates = [c for c in candidates if c.__name__ == part]
            continue
        fields = candidates[0].model_fields
        info = next((f for n, f in fields.items() if (f.alias or n) == part), None)
        candidates = _models_in(info.annotation) if info is not None else []
    return {info.alias or name for c in candidates[:1] for name, info in c.model_fields.items()}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation names (through list[...], unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        found += _models_in(arg)
    return found


MAX_FILE_BYTES = 5 * 2**20  # the largest shipped file (a value set) is 0.3 MB
MAX_VALUES = 250_000  # values a file may expand to, its aliases repeated (the largest shipped: about 20,000)


class TooManyValues(ValueError):
    """A file whose aliases expand past MAX_VALUES (a "billion laughs" file: a few hundred bytes whose
    anchors nest tenfold had a lint run for minutes and would have taken the service's memory)."""


def plain(value: Any, budget: list[int] | None = None) -> Any:
    """ruamel's commented containers and scalar subclasses as plain JSON-able Python values; with a
    `budget` ([values left]), TooManyValues once more values than that have been made."""
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise TooManyValues
    if isinstance(value, dict):
        return {str(k): plain(v, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v, budget) for v in value]
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, date):  # an unquoted 2026-12-01 reads as a date: kept as the text it was written as
        return value.isoformat()
    return value


def is_quoted(node: Any) -> bool:
    """A scalar written in quotes (positions inside it are one column on from its text's)."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString

    return isinstance(node, DoubleQuotedScalarString | SingleQuotedScalarString)
