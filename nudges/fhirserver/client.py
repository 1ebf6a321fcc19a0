"""Fetch what prefetch lacked from the EHR's FHIR server: one pooled client, a hard time budget, a
bound on concurrent requests per server, `next` links followed within limits.

Every fetch ends in a typed outcome, `Found` or `Failed`, so callers never sort values from exceptions.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import orjson

from ..errors import FhirServerError
from ..settings import Settings
from .tokens import BackendTokens

log = logging.getLogger("nudges.fhirserver")


@dataclass(frozen=True)
class Found:
    value: Any  # a resource, a Bundle, or None (a read of something that does not exist)


@dataclass(frozen=True)
class Failed:
    error: FhirServerError


Fetched = Found | Failed


class FhirClient:
    """One pooled HTTP client per process (keep-alive connections are reused across calls).

    A hook call may miss a dozen prefetch keys at once; a modest FHIR server with a small accept queue
    drops connections opened all together. So requests to one server are bounded
    (`fhir_max_connections_per_server`) and queue for a connection instead, within the same time budget."""

    def __init__(self, settings: Settings, tokens: BackendTokens | None = None) -> None:
        self.settings = settings
        self.tokens = tokens
        per_server = settings.fhir_max_connections_per_server
        timeout = httpx.Timeout(settings.fhir_timeout_seconds, connect=min(1.0, settings.fhir_timeout_seconds),
                                pool=settings.fhir_timeout_seconds)
        self.http = httpx.AsyncClient(timeout=timeout, follow_redirects=False,
                                      limits=httpx.Limits(max_connections=max(50, per_server),
                                                          max_keepalive_connections=max(20, per_server)),
                                      headers={"Accept": "application/fhir+json"})
        self._slots: dict[str, asyncio.Semaphore] = {}

    async def close(self) -> None:
        await self.http.aclose()

    def _slot(self, url: str) -> asyncio.Semaphore:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        slot = self._slots.get(origin)
        if slot is None:
            slot = self._slots[origin] = asyncio.Semaphore(self.settings.fhir_max_connections_per_server)
        return slot

    async def _get(self, url: str, token: str | None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self._slot(url):
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

    async def _one(self, base: str, query: str, token: str | None) -> Fetched:
        try:
            return Found(await self._fetch(base, query, token))
        except FhirServerError as exc:
            return Failed(exc)
        except (httpx.HTTPError, orjson.JSONDecodeError) as exc:  # the foreign errors of a fetch, mapped here
            return Failed(FhirServerError(f"FHIR server unreachable or invalid ({type(exc).__name__})"))

    async def fetch_all(self, base: str, token: str | None, queries: dict[str, str]) -> dict[str, Fetched]:
        """Every query concurrently within the time budget; what has not answered by then has failed."""
        tasks = {key: asyncio.ensure_future(self._one(base, query, token)) for key, query in queries.items()}
        if not tasks:
            return {}
        done, pending = await asyncio.wait(tasks.values(), timeout=self.settings.fhir_timeout_seconds)
        for task in pending:
            task.cancel()
        late = Failed(FhirServerError("FHIR server did not answer in time"))
        return {key: task.result() if task in done else late for key, task in tasks.items()}

    async def fetch_as_service(self, base: str, queries: dict[str, str]) -> dict[str, Fetched]:
        """Reads no hook call authorizes (id-only notifications, follow-up checks): with the service's own
        token when it has credentials for `base` (fhir_backend_clients), else without one."""
        tokens = self.tokens
        if tokens is None:
            return await self.fetch_all(base, None, queries)
        try:
            token = await tokens.token(base, self.http)
        except FhirServerError as exc:
            log.warning("no access token for FHIR reads", extra={"error": exc.diagnostics})
            return {key: Failed(exc) for key in queries}
        results = await self.fetch_all(base, token, queries)
        if token is not None and any(isinstance(v, Failed) and v.error.upstream_status == 401
                                     for v in results.values()):
            tokens.forget(base)  # refused: the next attempt gets a new one
        return results
