"""Server-side rendering: one Jinja2 environment (autoescaped), markdown as CommonMark without raw HTML,
and the page helper that adds the form token and the console cookie."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markdown_it import MarkdownIt
from markupsafe import Markup

from ... import __version__
from ...runtime import Runtime
from . import security

HERE = Path(__file__).resolve().parent
# "js-default": CommonMark with raw HTML disabled and link validation (no javascript: or data: URLs), so a
# card's markdown detail can never inject markup into the page.
_markdown = MarkdownIt("js-default")
NAV = (("/console/", "Overview"), ("/console/rules", "Rules"), ("/console/try", "Playground"),
       ("/console/replay", "Replay"), ("/console/audit", "Equity dashboard"))


def markdown(text: str | None) -> Markup:
    return Markup(_markdown.render(text or ""))  # html disabled: markdown-it escapes everything


def pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                  trim_blocks=True, lstrip_blocks=True)
env.filters.update(markdown=markdown, pretty=pretty, pct=pct)
env.globals.update(nav=NAV, version=__version__)


def page(request: Request, runtime: Runtime, viewer: security.Viewer, template: str, status: int = 200,
         **context: Any) -> HTMLResponse:
    """A whole page, or with `fragment` the part an htmx request swaps in; both carry the form token."""
    cookie, fresh = security.session_cookie(request)
    html = env.get_template(template).render(
        request=request, viewer=viewer, csrf=security.form_token(runtime, cookie), path=request.url.path,
        **context)
    response = HTMLResponse(html, status_code=status)
    if fresh:
        response.set_cookie(security.COOKIE, cookie, httponly=True, samesite="strict", path="/console",
                            secure=request.url.scheme == "https")
    return response


def error_page(status: int, message: str) -> HTMLResponse:
    """Errors under /console are pages for a person, not OperationOutcomes (api/errors.py decides)."""
    html = env.get_template("error.html").render(status=status, message=message, viewer=None, path="")
    return HTMLResponse(html, status_code=status)
