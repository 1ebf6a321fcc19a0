"""Who may use the console, and the headers and form tokens that keep a browser from being turned on it.

- On loopback the console needs no sign-in, like the API: the service is bound to loopback, the connection
  comes from loopback and carries no forwarding headers (a request relayed by a proxy is not a local user).
  Anything else is refused unless `console.proxy_auth` is configured.
- With `proxy_auth`, a reverse proxy that signs people in (oauth2-proxy, mod_auth_openidc, an ingress with
  OIDC) passes the user, and optionally groups, in headers. They are believed only on connections from
  `trusted_proxies`; a direct client is refused, so it cannot name itself.
- POST forms carry a token bound to a cookie (HMAC with a key derived from the service's own secret, so every
  replica accepts it), and a cross-site Origin or Sec-Fetch-Site is refused outright.
- Every console response carries a strict Content-Security-Policy: scripts and styles from the service's own
  files only, nothing inline, no frames, forms only to itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...errors import Forbidden, NotFound, Unauthorized
from ...fhirserver.guard import is_loopback
from ...settings import ProxyAuthSettings
from ..deps import RuntimeDep

log = logging.getLogger("nudges.console")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
           (b"cross-origin-opener-policy", b"same-origin"), (b"cache-control", b"no-store")]
FORWARDING = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")
COOKIE = "nudges_console"


@dataclass(frozen=True)
class Viewer:
    """Who is looking: a signed-in user (through the proxy) or whoever sits at the loopback machine."""

    name: str | None
    via: str  # "loopback" | "proxy"


def _networks(entries: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(e, strict=False) for e in entries]


def _from(peer: str, entries: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in _networks(entries))


def _proxy_viewer(request: Request, peer: str, proxy: ProxyAuthSettings) -> Viewer:
    if not _from(peer, proxy.trusted_proxies):
        log.warning("console refused: not from a trusted proxy", extra={"peer": peer})
        raise Forbidden("the console is reached through the sign-in proxy only")
    user = (request.headers.get(proxy.user_header) or "").strip()
    if not user:
        raise Unauthorized("console: the proxy sent no user header")
    groups = {g.strip().casefold() for g in (request.headers.get(proxy.groups_header) or "").split(",")} \
        if proxy.groups_header else set()

    def member(users: list[str], named: list[str]) -> bool:  # as identity providers compare: case aside
        return user.casefold() in {u.casefold() for u in users} or bool(groups & {g.casefold() for g in named})

    if not (proxy.allowed_users or proxy.allowed_groups) or member(proxy.allowed_users, proxy.allowed_groups):
        return Viewer(user, "proxy")
    if member(proxy.reader_users, proxy.reader_groups):
        if readable(request.url.path):
            return Viewer(user, "proxy-reader")
        raise Forbidden(f"{user} may read the rule pages only (what a card's 'Why this nudge' link opens; "
                        "console.proxy_auth.reader_users / reader_groups)")
    log.warning("console refused: user not allowed", extra={"user": user})
    raise Forbidden(f"{user} may not use the console (console.proxy_auth.allowed_users / allowed_groups)")


READABLE = ("/console/rules", "/console/static/")


def readable(path: str) -> bool:
    """What a reader may open: the rule list and pages (no patient data, no audit, no playground) and the
    files they draw with."""
    return path == READABLE[0] or path.startswith(READABLE[0] + "/") or path.startswith(READABLE[1])


async def viewer(request: Request, runtime: RuntimeDep) -> Viewer:
    """The console's gate, a dependency of every console route."""
    settings = runtime.settings.console
    if not settings.enabled:
        raise NotFound("the console is disabled (console.enabled)")
    peer = request.client.host if request.client else ""
    if settings.proxy_auth is not None:
        return _proxy_viewer(request, peer, settings.proxy_auth)
    local = is_loopback(runtime.settings.host) and is_loopback(peer) and not any(
        h in request.headers for h in FORWARDING)
    if not local:
        log.warning("console refused: not loopback and no console sign-in configured", extra={"peer": peer})
        raise Forbidden("the console is served without sign-in only on loopback; configure console.proxy_auth "
                        "(sign-in through a reverse proxy, see the README) to reach it from elsewhere")
    if not loopback_name(request.headers.get("host", "")):
        # DNS rebinding: a page of another site, its name re-pointed at 127.0.0.1, reaches the loopback
        # console from the user's own browser; its requests carry that site's name as Host
        log.warning("console refused: a Host that is not a loopback name on a loopback-only console")
        raise Forbidden("the console without sign-in answers only to a loopback name (localhost, 127.0.0.1, [::1]) "
                        "in the Host header")
    return Viewer(None, "loopback")


def loopback_name(host: str) -> bool:
    """Whether a Host header names this machine: localhost (or a name under .localhost, RFC 6761), or a
    loopback address, with or without a port."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if name in ("localhost", "localhost.") or name.endswith(".localhost"):
        return True
    return is_loopback(name)


ViewerDep = Annotated[Viewer, Depends(viewer)]


# -- CSRF -------------------------------------------------------------------------------------------
def _key(runtime: RuntimeDep) -> bytes:
    """A key of its own, derived from the service's patient-hash secret (kept in the database, shared by
    replicas), so the secret itself never signs anything a browser sees."""
    return hmac.new(runtime.store.hash_key(), b"nudges-console-csrf", hashlib.sha256).digest()


def session_cookie(request: Request) -> tuple[str, bool]:
    """The browser's console cookie, or a fresh one (True: to be set on the response)."""
    value = request.cookies.get(COOKIE, "")
    if len(value) == 43 and value.replace("-", "").replace("_", "").isalnum():
        return value, False
    return secrets.token_urlsafe(32), True


def form_token(runtime: RuntimeDep, cookie: str) -> str:
    return hmac.new(_key(runtime), cookie.encode(), hashlib.sha256).hexdigest()


def check_form(request: Request, runtime: RuntimeDep, token: str) -> None:
    """A POST must come from a console page: same-origin, and carrying the token of this browser's cookie."""
    site = request.headers.get("sec-fetch-site")
    if site not in (None, "same-origin", "none"):
        raise Forbidden("cross-site form posts are refused")
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        expected = {str(request.base_url).rstrip("/")}
        if runtime.settings.public_base_url:
            parts = urlsplit(runtime.settings.public_base_url)
            expected.add(f"{parts.scheme}://{parts.netloc}")
        if origin.rstrip("/") not in expected:
            raise Forbidden("form posted from another origin")
    cookie = request.cookies.get(COOKIE)
    if not cookie or not token or not hmac.compare_digest(form_token(runtime, cookie), token):
        raise Forbidden("the form has expired or did not come from this console: reload the page and try again")


# -- headers on every console response ----------------------------------------------------------------
class ConsoleHeaders:
    """Pure ASGI middleware: the strict CSP and friends on everything under /console, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"] == "/console" or scope["path"].startswith("/console/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in HEADERS if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
