"""Shared fixtures: real databases (SQLite file, local PostgreSQL), real HTTP servers on loopback."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import uvicorn

from nudges.api.app import create_app
from nudges.clock import FixedClock, parse_instant
from nudges.settings import Settings
from nudges.store import Store

ROOT = Path(__file__).resolve().parent.parent
PG_BASE = os.environ.get("NUDGES_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
NOW = "2026-03-02T12:00:00Z"


def pytest_configure(config: pytest.Config) -> None:
    """One rule-load cache for the whole session, never the user's own (rules/cache.py)."""
    import tempfile

    os.environ["NUDGES_CACHE_DIR"] = tempfile.mkdtemp(prefix="nudges-test-cache-")


# The longest test files, longest first: a parallel run (pytest -n 2 --dist loadfile) hands files out in
# collection order, so starting the long ones first keeps both processes busy to the end.
LONG_FILES = ("test_console_browser", "test_events", "test_cli", "test_screening", "test_console", "test_loop",
              "test_fastpath", "test_packaging", "test_replay", "test_screening_server", "test_subscriptions",
              "test_readme", "test_api", "test_delivery")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a file is kept


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.get("NUDGES_CACHE_DIR", ""), ignore_errors=True)


def postgres_reachable() -> str | None:
    try:
        with psycopg.connect(PG_BASE, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


@pytest.fixture(scope="module")
def pg_schema_url() -> Iterator[str]:
    """A private schema in the local PostgreSQL for each test module (dropped afterwards): tests of one
    module share it (they use patients of their own), and no module sees what another left behind, in
    whatever order a parallel run takes them."""
    problem = postgres_reachable()
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required in CI (CI=true) but unreachable at {PG_BASE}: {problem}")
        pytest.skip(f"PostgreSQL not reachable at {PG_BASE} ({problem}); set CI=true to require it")
    schema = f"nudges_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = PG_BASE.replace("postgresql://", "postgresql+psycopg://") + f"?options=-csearch_path%3D{schema}"
    yield url
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nudges.db"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(parse_instant(NOW))


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """A private copy of the frozen test rules (tests may edit it) with seeds and fixtures beside it."""
    target = tmp_path / "project" / "rules"
    shutil.copytree(ROOT / "tests" / "rules", target)
    for folder in ("seeds", "fhir_fixtures"):
        if (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, tmp_path / "project" / folder)
    return target


class _QuickServer(uvicorn.Server):
    """uvicorn checks for shutdown every 100 ms and then sleeps another 100 ms while connections close; a
    suite that starts a few hundred servers waits on that. The same steps, with short waits (and uvicorn's
    own shutdown should its internals change)."""

    async def main_loop(self) -> None:
        import asyncio

        while not await self.on_tick(0):
            await asyncio.sleep(0.005)

    async def shutdown(self, sockets: Any = None) -> None:
        import asyncio

        wait_tasks = getattr(self, "_wait_tasks_to_complete", None)
        if wait_tasks is None:
            await super().shutdown(sockets)
            return
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        await asyncio.sleep(0.005)
        await asyncio.wait_for(wait_tasks(), timeout=self.config.timeout_graceful_shutdown)
        if not self.force_exit:
            await self.lifespan.shutdown()


class LiveServer(httpx.Client):
    """The real app under uvicorn on a loopback port, with an HTTP client pointed at it."""

    def __init__(self, settings: Settings, clock: FixedClock | None, port: int = 0) -> None:
        self.app = create_app(settings, clock)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                lifespan="on")
        self.server = _QuickServer(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        super().__init__(base_url=f"http://127.0.0.1:{port}", timeout=30)

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    def on_loop(self, coroutine: Any) -> Any:
        """Run a coroutine on the service's own event loop (where its FHIR client lives)."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.runtime.loop).result(timeout=60)

    def run_due(self, now: Any = None) -> list[Any]:
        """Run due follow-ups now."""
        return list(self.on_loop(self.runtime.due.run_due(now)))

    def send_outbox(self, now: Any = None) -> list[Any]:
        """Send the deliveries due now."""
        return list(self.on_loop(self.runtime.deliveries.run_due(now)))

    def stop(self) -> None:
        self.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def make_client(tmp_path: Path, clock: FixedClock, rules_dir: Path) -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def make(listen_port: int = 0, **overrides: Any) -> LiveServer:
        values: dict[str, Any] = {"rules": rules_dir, "database_url": f"sqlite:///{tmp_path}/nudges.db",
                                  "reload_interval_seconds": 0}
        values.update(overrides)
        server = LiveServer(Settings(**values), clock, listen_port)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def client(make_client: Callable[..., LiveServer]) -> LiveServer:
    return make_client()


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the service fetches many prefetch keys at once
    daemon_threads = True


class FhirServer:
    """A real FHIR server on loopback serving fixture resources (read and search by patient)."""

    def __init__(self) -> None:
        self.resources: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str | None]] = []
        self.delay = 0.0
        self.page_size = 1000
        self.next_base: str | None = None  # where `next` links point (another server's base), else this one
        # SMART Backend Services: with `token` set, reads need `Bearer <token>`, which POST /token hands
        # out for a client assertion signed by `client_key` (public) for `client_id`.
        self.token: str | None = None
        self.client_id = "nudges-backend"
        self.client_key: Any = None
        self.token_requests: list[dict[str, str]] = []
        self.token_refusals = 0
        # Writes (POST /fhir/Type): each one recorded; `write_statuses` scripts the answers (then 201), and
        # If-None-Exist on `identifier=` is honoured as a FHIR server does (200 when it finds one).
        self.writes: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.write_statuses: list[int] = []
        # Operations this server offers (`/fhir/Subscription/s1/$events`, any query): path -> body; each
        # request to one is recorded in `requests` like every read.
        self.operations: dict[str, dict[str, Any]] = {}

        self.in_flight = self.max_in_flight = 0
        self.connections: set[tuple[str, int]] = set()  # client (address, port): one per connection used
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real FHIR servers do

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                from urllib.parse import parse_qsl

                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.startswith("/fhir/"):
                    status, location = server.write(self.path, dict(self.headers.items()), orjson.loads(raw))
                    self.send_response(status)
                    if location:
                        self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                form = dict(parse_qsl(raw.decode()))
                server.token_requests.append(form)
                status, body = server.grant(self.path, form)
                self.reply(status, body)

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Authorization")))
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.connections.add(self.client_address)
                try:
                    self.serve()
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def serve(self) -> None:
                if server.delay:
                    threading.Event().wait(server.delay)
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self.reply(401, {"resourceType": "OperationOutcome", "issue": []})
                    return
                status, body = server.answer(self.path)
                self.reply(status, body)

            def reply(self, status: int, body: dict[str, Any]) -> None:
                payload = orjson.dumps(body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def token_url(self) -> str:
        return self.base.removesuffix("/fhir") + "/token"

    def grant(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        import jwt

        if path != "/token" or self.token_refusals > 0:
            self.token_refusals = max(0, self.token_refusals - 1)
            return 401, {"error": "invalid_client"}
        try:
            claims = jwt.decode(form.get("client_assertion", ""), self.client_key, algorithms=["RS384", "ES384"],
                                audience=self.token_url, options={"require": ["exp", "iat", "jti", "iss", "sub"]})
        except jwt.PyJWTError:
            return 401, {"error": "invalid_client"}
        if (form.get("grant_type") != "client_credentials" or claims["iss"] != self.client_id
                or claims["sub"] != self.client_id or form.get("client_assertion_type")
                != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"):
            return 400, {"error": "invalid_request"}
        return 200, {"access_token": self.token, "token_type": "bearer", "expires_in": 300,
                     "scope": form.get("scope", "")}

    def write(self, path: str, headers: dict[str, str], resource: dict[str, Any]) -> tuple[int, str | None]:
        self.writes.append((path, headers, resource))
        if self.write_statuses:
            return self.write_statuses.pop(0), None
        criteria = {k.lower(): v for k, v in headers.items()}.get("if-none-exist", "")
        wanted = criteria.removeprefix("identifier=")
        for existing in self.resources:
            if existing["resourceType"] == resource["resourceType"] and wanted and any(
                    f"{i.get('system')}|{i.get('value')}" == wanted for i in existing.get("identifier") or ()):
                return 200, f"{self.base}/{existing['resourceType']}/{existing['id']}/_history/1"
        created = {**resource, "id": f"w{len(self.writes)}"}
        self.resources.append(created)
        return 201, f"{self.base}/{created['resourceType']}/{created['id']}/_history/1"

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(path)
        if parts.path in self.operations:
            return 200, self.operations[parts.path]
        segments = parts.path.removeprefix("/fhir/").split("/")
        if len(segments) == 2:
            found = [r for r in self.resources if r["resourceType"] == segments[0] and r.get("id") == segments[1]]
            return (200, found[0]) if found else (404, {"resourceType": "OperationOutcome", "issue": []})
        query = parse_qs(parts.query)
        kind = segments[0]
        matches = [r for r in self.resources if r["resourceType"] == kind]
        codes = query.get("code", [""])[0]
        if codes:
            wanted = set(codes.split(","))
            matches = [r for r in matches if any(f"{c.get('system')}|{c.get('code')}" in wanted
                                                 for c in (r.get("code") or {}).get("coding", []))]
        offset = int(query.get("_offset", ["0"])[0])
        page = matches[offset: offset + self.page_size]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(matches),
                                  "entry": [{"resource": r} for r in page]}
        if offset + self.page_size < len(matches):
            after = f"{self.next_base or self.base}/{kind}?{parts.query}&_offset={offset + self.page_size}"
            bundle["link"] = [{"relation": "next", "url": after}]
        return 200, bundle

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fhir_server() -> Iterator[FhirServer]:
    server = FhirServer()
    yield server
    server.close()


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    """One store on the parametrised database (a module may define its own)."""
    return make_store()


@pytest.fixture
def make_store(database_url: str, clock: FixedClock) -> Iterator[Callable[..., Store]]:
    """Stores on the parametrised database, migrated, and disposed after the test."""
    stores: list[Store] = []

    def make(**kwargs: Any) -> Store:
        store = Store(database_url, clock, **kwargs)
        store.migrate()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Debian Chromium per test module, driven by Playwright (never `playwright install`: the
    browser comes from apt, see .ci/run). Per module, not per session: Playwright's sync API keeps an event
    loop running in the main thread while it is open, and tests after it (in any order a parallel run
    picks) start event loops of their own. Skipped where Chromium is missing, unless CI=true."""
    executable = shutil.which("chromium")
    if executable is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Chromium is required in CI (CI=true): apt-get install chromium")
        pytest.skip("no chromium on PATH (apt-get install chromium fonts-dejavu-core)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        yield launched
        launched.close()


def loopback_only(context: Any) -> list[str]:
    """Abort every request that is not to loopback; returns the list of what was blocked."""
    from urllib.parse import urlsplit

    blocked: list[str] = []

    def route(r: Any) -> None:
        if urlsplit(r.request.url).hostname in ("127.0.0.1", "localhost"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    return blocked


@contextlib.contextmanager
def watched_page(browser: Any, base_url: str, allow: tuple[str, ...] = (), **options: Any) -> Iterator[Any]:
    """A page in its own browser context with every request off loopback aborted; when the block ends,
    nothing may have been blocked and the browser may have logged no error (CSP violations show there)
    but those containing one of `allow` (a test's own expected 4xx, which Chromium logs)."""
    context = browser.new_context(base_url=base_url, **options)
    blocked = loopback_only(context)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        context.close()
    assert not blocked, f"requests off loopback: {blocked}"
    problems = [p for p in problems if not any(a in p for a in allow)]
    assert not problems, f"browser errors (CSP violations show here): {problems}"
