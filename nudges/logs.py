"""Logging as JSON lines (for machines) or plain text (`log_format: text`, for people). Callers pass only
safe fields in `extra`; tokens, bodies and patient ids are never logged, and both formats drop any field
whose name suggests one slipped through."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "color_message"}
_FORBIDDEN = ("token", "authorization", "patient", "body", "password", "secret")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's extra fields that may be logged."""
    found = {}
    for key, value in vars(record).items():
        if key in _RESERVED or key.startswith("_"):
            continue
        if any(word in key.lower() for word in _FORBIDDEN):
            continue
        found[key] = value
    if record.exc_info and record.exc_info[0] is not None:
        found["exception"] = record.exc_info[0].__name__
    return found


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": _time(record), "level": record.levelname.lower(), "logger": record.name,
                                 "message": record.getMessage()}
        entry.update(_fields(record))
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`2026-03-02T12:00:00.000Z WARNING nudges.runtime: message  key=value ...`"""

    def format(self, record: logging.LogRecord) -> str:
        fields = "  ".join(f"{key}={value}" for key, value in _fields(record).items())
        line = f"{_time(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        return f"{line}  {fields}" if fields else line


def configure(level: str = "INFO", log_format: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if log_format == "text" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
