"""A FHIR server's Bulk Data `$export` (FHIR Bulk Data Access 2.0): kick off, poll, download, resume.

The export is downloaded into a folder the user names, with the service's own credentials for that server
(`fhir_backend_clients`, SMART Backend Services). What has been done is kept in `.export.json` there
after every step, so a run that stopped (interrupted, timed out, a dropped connection) picks up where it
was: the same job is polled again instead of kicked off anew, finished files are not fetched again, and a
file cut short is continued with a Range request (or fetched again whole when the server ignores Range).

The access token goes only to the FHIR server's own origin: a manifest may point at file storage
elsewhere (signed URLs), which must not see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urljoin, urlsplit

import httpx
import orjson

from ..errors import FhirServerError
from ..fhirserver.client import retry_after
from ..fhirserver.tokens import BackendTokens
from ..settings import Settings

STATE = ".export.json"
NDJSON = "application/fhir+ndjson"
ATTEMPTS = 5  # per request, for what a retry can help: connection errors, 429, transient 5xx
BACKOFF = 1.0  # seconds, doubled per attempt
POLL_DEFAULT = 2.0  # seconds between polls when the server gives no Retry-After
POLL_MAX = 60.0


class ExportFailed(Exception):
    """The export could not be had: refused, failed on the server, timed out, or a file that would not come."""


@dataclass(frozen=True)
class ExportRequest:
    base: str
    level: str = "patient"  # system | patient | group
    group: str | None = None
    types: tuple[str, ...] = ()
    since: str | None = None  # an instant in UTC with Z (servers compare it as text; an offset can match nothing)

    @property
    def url(self) -> str:
        base = self.base.rstrip("/")
        if self.level == "system":
            return f"{base}/$export"
        if self.level == "group":
            return f"{base}/Group/{self.group}/$export"
        return f"{base}/Patient/$export"

    @property
    def params(self) -> dict[str, str]:
        params = {"_outputFormat": NDJSON}
        if self.types:
            params["_type"] = ",".join(self.types)
        if self.since:
            params["_since"] = self.since
        return params


def diagnostics(response: httpx.Response) -> str:
    """What an OperationOutcome body says, else the status alone."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return f"HTTP {response.status_code}"
    issues = body.get("issue") if isinstance(body, dict) else None
    texts = [str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code"))
             for i in issues or () if isinstance(i, dict)]
    return f"HTTP {response.status_code}: {'; '.join(texts)}" if texts else f"HTTP {response.status_code}"


def _transient(response: httpx.Response) -> bool:
    """A status the spec says to retry: 429, 503, or a 5xx whose OperationOutcome says `transient`."""
    if response.status_code in (429, 502, 503, 504):
        return True
    if response.status_code < 500:
        return False
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return False
    issues = body.get("issue") if isinstance(body, dict) else None
    return any(isinstance(i, dict) and i.get("code") == "transient" for i in issues or ())


def wait_for(response: httpx.Response, default: float) -> float:
    """How long to wait before asking again: the server's Retry-After, else `default`, within sane bounds."""
    seconds = retry_after(response.headers)
    return min(max(default if seconds is None else seconds, 0.2), POLL_MAX)


class Exporter:
    """Runs one export into `folder`; `run` returns the NDJSON files to screen, in manifest order."""

    def __init__(self, settings: Settings, folder: Path, err: TextIO, timeout: float = 3600.0) -> None:
        self.settings, self.folder, self.err, self.timeout = settings, folder, err, timeout
        self.tokens = BackendTokens(settings.fhir_backend_clients) if settings.fhir_backend_clients else None
        self.state: dict[str, Any] = {}
        self.notes: list[str] = []  # what the server's error files said, for the report

    # -- state on disk -------------------------------------------------------------------------------
    def _load(self, request: ExportRequest, fresh: bool) -> None:
        path = self.folder / STATE
        if fresh and path.exists():
            path.unlink()
        wanted = orjson.loads(orjson.dumps(asdict(request)))  # as it reads back from the file
        if path.exists():
            state = orjson.loads(path.read_bytes())
            if state.get("request") != wanted:
                raise ExportFailed(f"{self.folder} holds another export ({state.get('request')}); choose another "
                                   "folder, or pass --fresh to replace it")
            self.state = state
        else:
            self.state = {"request": wanted}

    def _save(self) -> None:
        path = self.folder / STATE
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(orjson.dumps(self.state, option=orjson.OPT_INDENT_2))
        os.replace(temporary, path)

    # -- requests ------------------------------------------------------------------------------------
    def _same_origin(self, url: str) -> bool:
        mine, theirs = urlsplit(self.state["request"]["base"]), urlsplit(url)
        return (mine.scheme, mine.netloc) == (theirs.scheme, theirs.netloc)

    async def _headers(self, http: httpx.AsyncClient, url: str, extra: dict[str, str]) -> dict[str, str]:
        headers = dict(extra)
        if self.tokens is not None and self._same_origin(url):
            try:
                token = await self.tokens.token(self.state["request"]["base"], http)
            except FhirServerError as exc:
                raise ExportFailed(f"no access token for {self.state['request']['base']}: {exc.diagnostics}") from None
            if token:
                headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _send(self, http: httpx.AsyncClient, method: str, url: str, headers: dict[str, str],
                    what: str, **kwargs: Any) -> httpx.Response:
        """A request with retries where they help; a refused token is dropped and asked for again once."""
        refreshed = False
        for attempt in range(ATTEMPTS):
            try:
                response = await http.request(method, url, headers=await self._headers(http, url, headers), **kwargs)
            except httpx.HTTPError as exc:
                if attempt + 1 == ATTEMPTS:
                    raise ExportFailed(f"{what}: {url} unreachable after {ATTEMPTS} attempts "
                                       f"({type(exc).__name__})") from None
                await asyncio.sleep(BACKOFF * 2 ** attempt)
                continue
            if response.status_code == 401 and self.tokens is not None and not refreshed:
                self.tokens.forget(self.state["request"]["base"])
                refreshed = True
                continue
            if _transient(response) and attempt + 1 < ATTEMPTS:
                await asyncio.sleep(wait_for(response, BACKOFF * 2 ** attempt))
                continue
            return response
        raise ExportFailed(f"{what}: {url} kept failing")

    # -- the steps -------------------------------------------------------------------------------------
    async def _kick_off(self, http: httpx.AsyncClient, request: ExportRequest) -> None:
        response = await self._send(http, "GET", request.url, {"Accept": "application/fhir+json",
                                                               "Prefer": "respond-async"},
                                    "export kick-off", params=request.params)
        location = response.headers.get("Content-Location")
        if response.status_code != 202 or not location:
            raise ExportFailed(f"the server refused the export ({request.url}): {diagnostics(response)}")
        self.state.update(status_url=urljoin(request.url, location), kicked_off=time.time())
        self._save()
        self.err.write(f"export: kicked off {request.url}; status at {self.state['status_url']}\n")

    async def _poll(self, http: httpx.AsyncClient, request: ExportRequest) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        shown = ""
        while True:
            response = await self._send(http, "GET", self.state["status_url"], {"Accept": "application/json"},
                                        "export status")
            if response.status_code == 200:
                try:
                    manifest = orjson.loads(response.content)
                except orjson.JSONDecodeError:
                    raise ExportFailed(f"the export's status URL answered 200 with something that is not a JSON "
                                       f"manifest ({response.headers.get('content-type', 'no content type')}): "
                                       "is SOURCE the FHIR base URL?") from None
                if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
                    raise ExportFailed("the export's manifest has no output list")
                return manifest
            if response.status_code in (404, 410) and self.state.get("resumed"):
                self.err.write("export: the server no longer knows the earlier job; kicking off again\n")
                self.state.pop("status_url", None)
                self.state["resumed"] = False
                await self._kick_off(http, request)
                continue
            if response.status_code != 202:
                raise ExportFailed(f"the export failed on the server: {diagnostics(response)}")
            progress = response.headers.get("X-Progress", "in progress")
            if progress != shown:
                self.err.write(f"export: {progress}\n")
                shown = progress
            wait = wait_for(response, POLL_DEFAULT)
            if time.monotonic() + wait > deadline:
                raise ExportFailed(f"the export did not complete within {self.timeout:g} s; it may still be "
                                   f"running at {self.state['status_url']}: run the same command again to keep "
                                   "waiting for it")
            await asyncio.sleep(wait)

    def _plan(self, manifest: dict[str, Any]) -> None:
        files: dict[str, dict[str, Any]] = self.state.setdefault("files", {})
        listed = {entry["url"] for entry in files.values()}
        for number, entry in enumerate(manifest.get("output") or [], 1):
            kind = str(entry.get("type") or "Resource")
            name = f"{number:04d}.{kind}.ndjson"
            url = urljoin(self.state["status_url"], str(entry.get("url")))
            if name not in files and url in listed:  # a manifest naming one file twice: read once, not counted twice
                self.notes.append(f"the export's manifest lists {url} more than once: downloaded once")
                continue
            listed.add(url)
            files.setdefault(name, {"url": url, "count": entry.get("count"), "done": False})
        errors: dict[str, dict[str, Any]] = self.state.setdefault("errors", {})
        for number, entry in enumerate(manifest.get("error") or [], 1):
            errors.setdefault(f"errors/{number:04d}.OperationOutcome.ndjson", {
                "url": urljoin(self.state["status_url"], str(entry.get("url"))), "done": False})

    async def _download(self, http: httpx.AsyncClient, name: str, entry: dict[str, Any], token_ok: bool) -> None:
        """One file into `name`, continuing a `.part` left by an earlier run where the server allows."""
        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"Accept": NDJSON}
        if have:
            headers["Range"] = f"bytes={have}-"
        url = entry["url"]
        whole = False
        for attempt in range(ATTEMPTS):
            try:
                auth = await self._headers(http, url, headers) if token_ok else headers
                async with http.stream("GET", url, headers=auth) as response:
                    if response.status_code == 416 and have:  # nothing left: the part was whole
                        whole = True
                        break
                    if response.status_code not in (200, 206):
                        await response.aread()
                        if _transient(response) and attempt + 1 < ATTEMPTS:
                            await asyncio.sleep(wait_for(response, BACKOFF * 2 ** attempt))
                            continue
                        raise ExportFailed(f"could not download {url}: {diagnostics(response)}")
                    mode = "ab" if response.status_code == 206 else "wb"  # 200: the server ignored Range
                    with open(partial, mode) as stream:
                        async for block in response.aiter_bytes():
                            stream.write(block)
                whole = True
                break
            except httpx.HTTPError as exc:
                if attempt + 1 == ATTEMPTS:
                    raise ExportFailed(f"could not download {url} ({type(exc).__name__}); run again to "
                                       "continue where it stopped") from None
                have = partial.stat().st_size if partial.exists() else 0
                headers = {"Accept": NDJSON, **({"Range": f"bytes={have}-"} if have else {})}
                await asyncio.sleep(BACKOFF * 2 ** attempt)
        if not whole:
            raise ExportFailed(f"could not download {url}: the server kept answering with a transient error")
        os.replace(partial, target)
        entry["done"] = True
        self._save()
        if isinstance(entry.get("count"), int):
            with open(target, "rb") as stream:
                lines = sum(1 for line in stream if line.strip())
            if lines != entry["count"]:
                self.notes.append(f"{name}: the manifest announced {entry['count']} resource(s), the file has {lines}")

    def _error_notes(self) -> None:
        """The server's error files (OperationOutcomes), summarised: what it could not export is not silent."""
        said: dict[str, int] = {}
        for name in self.state.get("errors", {}):
            path = self.folder / name
            if not path.exists():
                continue
            for line in path.read_bytes().splitlines():
                try:
                    outcome = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                for issue in outcome.get("issue") or () if isinstance(outcome, dict) else ():
                    text = f"{issue.get('severity', 'error')}: {issue.get('diagnostics') or issue.get('code')}"
                    said[text] = said.get(text, 0) + 1
        self.notes += [f"the server reported {count}× {text}" for text, count in sorted(said.items())]

    async def _run(self, request: ExportRequest) -> list[Path]:
        timeout = httpx.Timeout(60.0, connect=10.0)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as http:
            if self.state.get("complete"):
                self.err.write(f"export: using the one already downloaded in {self.folder} (transactionTime "
                               f"{self.state['manifest'].get('transactionTime')}); --fresh starts a new one\n")
            else:
                if "manifest" not in self.state:
                    if "status_url" in self.state:
                        self.state["resumed"] = True
                        self.err.write(f"export: resuming the job at {self.state['status_url']}\n")
                    else:
                        await self._kick_off(http, request)
                    self.state["manifest"] = await self._poll(http, request)
                    self._plan(self.state["manifest"])
                    self._save()
                token_ok = bool(self.state["manifest"].get("requiresAccessToken", True))
                pending = [(n, e) for n, e in {**self.state["files"], **self.state["errors"]}.items() if not e["done"]]
                for number, (name, entry) in enumerate(pending, 1):
                    self.err.write(f"export: downloading {number}/{len(pending)} {name}\n")
                    await self._download(http, name, entry, token_ok)
                self.state["complete"] = True
                self._save()
                with contextlib.suppress(httpx.HTTPError, ExportFailed):  # the server may drop the job's files now
                    await http.delete(self.state["status_url"], headers=await self._headers(
                        http, self.state["status_url"], {}))
        self._error_notes()
        return [self.folder / name for name in sorted(self.state["files"])]

    def run(self, request: ExportRequest, fresh: bool = False) -> list[Path]:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._load(request, fresh)
        return asyncio.run(self._run(request))
