"""Fetch what prefetch lacked from the EHR's FHIR server: one pooled client, a hard time budget, a
bound on concurrent requests per server, `next` links followed within limits. Also the service's own
writes (pushed Communications and Tasks, managed Subscriptions), with its own token.

Every fetch ends in a typed outcome, `Found` or `Failed`, and every write in `Written` or `NotWritten`
(any other request: `Answered` or `Unreached`), so callers never sort values from exceptions.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import orjson

from ..errors import DeliveryError, FhirServerError
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


@dataclass(frozen=True)
class Answered:
    """The server answered (any status)."""

    status: int
    headers: httpx.Headers
    body: Any  # parsed JSON, or None


@dataclass(frozen=True)
class Unreached:
    error: DeliveryError  # no answer: connection refused, timeout, no token


@dataclass(frozen=True)
class Written:
    status: int  # 201 created; 200 a conditional create found it already there
    location: str | None  # Type/id(/_history/n) of the resource


@dataclass(frozen=True)
class NotWritten:
    error: DeliveryError


def retryable(status: int) -> bool:
    """Worth trying again: the server's trouble (5xx), a timeout (408) or a rate limit (429)."""
    return status >= 500 or status in (408, 429)


def retry_after(headers: httpx.Headers) -> float | None:
    """Retry-After as seconds from now, given as seconds or as an HTTP date (RFC 9110); None when absent
    or unreadable, so the caller's own back-off applies. An HTTP date is the server's wall time, so it is
    read against the real time, not the service's (possibly pinned) clock."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0) if when.tzinfo else None


def diagnostics(body: Any) -> str:
    """The first issue of an OperationOutcome, shortened: what the server said about a refusal."""
    issues = body.get("issue") if isinstance(body, dict) else None
    if isinstance(issues, list) and issues and isinstance(issues[0], dict):
        text = issues[0].get("diagnostics") or (issues[0].get("details") or {}).get("text") or issues[0].get("code")
        return str(text)[:200] if text else ""
    return ""


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS verification context (the CA bundle httpx would load): built once per process, since loading
    the bundle costs as much as a hook call's whole evaluation."""
    return httpx.create_ssl_context()


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
        self.http = httpx.AsyncClient(timeout=timeout, follow_redirects=False, verify=tls_context(),
                                      limits=httpx.Limits(max_connections=max(50, per_server),
                                                          max_keepalive_connections=max(20, per_server)),
                                      headers={"Accept": "application/fhir+json"})
        self._slots: dict[str, asyncio.Semaphore] = {}
        # The service's own writes wait for slots of their own: a slow write (seconds) must never hold the
        # connections a hook call's 2 s budget depends on.
        self._write_slots: dict[str, asyncio.Semaphore] = {}

    async def close(self) -> None:
        await self.http.aclose()

    def _slot(self, url: str, slots: dict[str, asyncio.Semaphore] | None = None) -> asyncio.Semaphore:
        slots = self._slots if slots is None else slots
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        slot = slots.get(origin)
        if slot is None:
            slot = slots[origin] = asyncio.Semaphore(self.settings.fhir_max_connections_per_server)
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
                # not followed (the call's token is for its own server alone), and not used as if it were
                # all: a result on the missing pages would read as absent ("due for screening")
                log.warning("refused a next link to another server")
                raise FhirServerError(f"the FHIR server's search continues on another server ({parts.scheme}://"
                                      f"{parts.netloc}), which the service does not follow: the search is incomplete")
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

    async def _service_token(self, base: str) -> str | None:
        """The service's own token for `base` (None without credentials); DeliveryError when it cannot be had."""
        if self.tokens is None:
            return None
        try:
            return await self.tokens.token(base, self.http)
        except FhirServerError as exc:
            raise DeliveryError(f"no access token: {exc.diagnostics}") from None

    async def request_as_service(self, method: str, base: str, path: str, *, body: Any = None,
                                 headers: dict[str, str] | None = None,
                                 timeout: float | None = None) -> Answered | Unreached:
        """One request with the service's own token (SMART Backend Services) when it has credentials for
        `base`; a 401 drops the cached token, so the next attempt gets a new one."""
        try:
            token = await self._service_token(base)
        except DeliveryError as exc:
            return Unreached(exc)
        sent = {"Accept": "application/fhir+json", **(headers or {})}
        if token:
            sent["Authorization"] = f"Bearer {token}"
        content = None
        if body is not None:
            content = orjson.dumps(body)
            sent["Content-Type"] = "application/fhir+json"
        url = f"{base}/{path}" if path else base
        try:
            async with self._slot(url, self._write_slots):
                response = await self.http.request(method, url, content=content, headers=sent,
                                                   timeout=timeout or self.settings.delivery.timeout_seconds)
        except httpx.HTTPError as exc:  # no answer: whether the server acted on it is unknown
            return Unreached(DeliveryError(f"FHIR server unreachable ({type(exc).__name__})"))
        if response.status_code == 401 and token and self.tokens is not None:
            self.tokens.forget(base)
        try:
            parsed = orjson.loads(response.content) if response.content else None
        except orjson.JSONDecodeError:
            parsed = None
        return Answered(response.status_code, response.headers, parsed)

    async def create_as_service(self, base: str, resource: dict[str, Any], if_none_exist: str) -> Written | NotWritten:
        """Conditional create (`If-None-Exist`): a resource the criteria already find is not created again,
        so a retry after a lost answer never makes a second one."""
        kind = resource["resourceType"]
        answer = await self.request_as_service("POST", base, kind, body=resource,
                                               headers={"If-None-Exist": if_none_exist, "Prefer": "return=minimal"})
        if isinstance(answer, Unreached):
            return NotWritten(answer.error)
        if answer.status in (200, 201):
            location = answer.headers.get("location") or answer.headers.get("content-location")
            if location and "/" in location:
                location = "/".join(location.split("/")[-4 if "/_history/" in location else -2:])
            return Written(answer.status, location)
        said = diagnostics(answer.body)
        message = f"FHIR server answered {answer.status} to the {kind} create" + (f": {said}" if said else "")
        return NotWritten(DeliveryError(message, retry=retryable(answer.status) or answer.status == 401,
                                        upstream_status=answer.status, retry_after=retry_after(answer.headers)))

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
