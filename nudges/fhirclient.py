"""Fetch what prefetch lacked from the EHR's FHIR server: one pooled client, a hard time budget,
`next` links followed within limits, and guards against server-side request forgery."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import httpx
import orjson

from .errors import BadRequest, FhirServerError
from .settings import Settings

if TYPE_CHECKING:
    from .fhirauth import BackendTokens

log = logging.getLogger("nudges.fhirclient")
LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server(base: str, settings: Settings, allowed: list[str] | None = None) -> str:
    """Refuse fhirServer values that would make the service an open proxy."""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("fhirServer must be an absolute http(s) URL", expression="fhirServer")
    if parts.username or parts.password:
        raise BadRequest("fhirServer must not carry credentials", expression="fhirServer")
    if parts.scheme == "http" and not (is_loopback(parts.hostname) or settings.fhir_allow_http):
        raise BadRequest("fhirServer must use https (http is accepted only for loopback)",
                         expression="fhirServer")
    try:
        address = ipaddress.ip_address(parts.hostname.strip("[]"))
        if address.is_link_local or address.is_multicast or address.is_unspecified:
            raise BadRequest("fhirServer address is not allowed", expression="fhirServer")
    except ValueError:
        pass
    allow = [*settings.fhir_server_allowlist, *(allowed or [])]
    normalized = base.rstrip("/") + "/"
    if allow and not any(normalized.startswith(a.rstrip("/") + "/") for a in allow):
        raise BadRequest("fhirServer is not on the allow-list", expression="fhirServer")
    return base.rstrip("/")


class FhirClient:
    def __init__(self, settings: Settings, tokens: BackendTokens | None = None) -> None:
        self.settings = settings
        self.tokens = tokens
        timeout = httpx.Timeout(settings.fhir_timeout_seconds, connect=min(1.0, settings.fhir_timeout_seconds))
        self.http = httpx.AsyncClient(timeout=timeout, follow_redirects=False,
                                      limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
                                      headers={"Accept": "application/fhir+json"})

    async def close(self) -> None:
        await self.http.aclose()

    async def _get(self, url: str, token: str | None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.http.get(url, headers=headers)
        if response.status_code == 404:
            return None  # a read of something that does not exist: no data
        if response.status_code != 200:
            raise FhirServerError(f"FHIR server answered {response.status_code}",
                                  upstream_status=response.status_code)
        return orjson.loads(response.content)

    async def _fetch(self, base: str, query: str, token: str | None) -> Any:
        url = f"{base}/{query}"
        first = await self._get(url, token)
        if not (isinstance(first, dict) and first.get("resourceType") == "Bundle"):
            return first
        origin = urlsplit(base)
        page, pages = first, 1
        while pages < self.settings.fhir_max_pages:
            link = next((ln.get("url") for ln in page.get("link") or () if ln.get("relation") == "next"), None)
            if not link:
                break
            nxt = urljoin(url, link)
            parts = urlsplit(nxt)
            if (parts.scheme, parts.netloc) != (origin.scheme, origin.netloc):
                log.warning("ignored a next link to another server")
                break
            page = await self._get(nxt, token)
            if not isinstance(page, dict):
                break
            first.setdefault("entry", []).extend(page.get("entry") or [])
            pages += 1
        first.pop("link", None)
        return first

    async def fetch_all(self, base: str, token: str | None, queries: dict[str, str]) -> dict[str, Any]:
        """Fetch every query concurrently within the time budget; a key that fails maps to its error."""
        keys = list(queries)

        async def one(key: str) -> Any:
            try:
                return await self._fetch(base, queries[key], token)
            except FhirServerError as exc:
                return exc
            except (httpx.HTTPError, orjson.JSONDecodeError, ValueError) as exc:
                return FhirServerError(f"FHIR server unreachable or invalid ({type(exc).__name__})")

        try:
            async with asyncio.timeout(self.settings.fhir_timeout_seconds):
                results = await asyncio.gather(*(one(k) for k in keys))
        except TimeoutError:
            return {k: FhirServerError("FHIR server did not answer in time") for k in keys}
        return dict(zip(keys, results, strict=True))

    async def fetch_as_service(self, base: str, queries: dict[str, str]) -> dict[str, Any]:
        """Reads no hook call authorizes (id-only notifications, follow-up checks): with the service's own
        token when it has credentials for `base` (fhir_backend_clients), else without one."""
        tokens = self.tokens
        if tokens is None:
            return await self.fetch_all(base, None, queries)
        try:
            token = await tokens.token(base, self.http)
        except FhirServerError as exc:
            log.warning("no access token for FHIR reads", extra={"error": exc.diagnostics})
            return {key: exc for key in queries}
        results = await self.fetch_all(base, token, queries)
        if token is not None and any(isinstance(v, FhirServerError) and v.upstream_status == 401
                                     for v in results.values()):
            tokens.forget(base)  # refused: the next attempt gets a new one
        return results
