"""YAML with positions: every problem an informaticist sees says path:line:column."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from .schema import UNION_TAGS


@dataclass(frozen=True, order=True)
class Problem:
    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


def load(path: Path, display: str) -> tuple[Any, list[Problem]]:
    """Round-trip load (keeps line/column marks); syntax errors become problems."""
    try:
        yaml = YAML(typ="rt")
        yaml.preserve_quotes = True
        data = yaml.load(path.read_text(encoding="utf-8"))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return None, [Problem(display, line, col, f"YAML syntax: {exc.problem or exc.context}")]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(display, 1, 1, f"cannot read file: {exc}")]
    if not isinstance(data, CommentedMap):
        return None, [Problem(display, 1, 1, "the file must be a YAML mapping")]
    return data, []


def position(data: Any, loc: Sequence[Any], *, value: bool = False) -> tuple[int, int]:
    """1-based line/column of the deepest node of `loc` that exists (the key, or its value)."""
    line, col = 1, 1
    node = data
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
    return line, col


def validate(model: type[BaseModel], data: Any, display: str) -> tuple[Any, list[Problem]]:
    try:  # validate plain values (ruamel scalar subclasses confuse FHIRPath); `data` keeps positions
        return model.model_validate(plain(data)), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if p not in UNION_TAGS)
            line, col = position(data, loc)
            where = ".".join(str(p) for p in loc)
            kind = error["type"]
            if kind == "extra_forbidden":
                message = f"unknown field '{loc[-1]}'"
            elif kind == "missing":
                message = f"missing required field '{where}'"
            else:
                message = f"{where}: {error['msg']}" if where else error["msg"]
            problems.append(Problem(display, line, col, message))
        return None, problems


def plain(value: Any) -> Any:
    """ruamel's commented containers and scalar subclasses as plain JSON-able Python values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value
