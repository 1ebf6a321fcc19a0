"""`/docs` works with the network blocked: Swagger UI from the package, nothing from a CDN or validator."""

from __future__ import annotations

import hashlib
import re
from html.parser import HTMLParser
from typing import Any

import pytest
from conftest import LiveServer

from nudges.api.routes.docs import ASSETS, ASSETS_DIR


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.fixture(scope="module")
def vendored() -> dict[str, str]:
    table = (ASSETS_DIR / "VENDORED.md").read_text()
    return dict(re.findall(r"^\| (\S+) \| ([0-9a-f]{64}) \|$", table, re.MULTILINE))


def test_the_vendored_files_are_the_pinned_ones_with_their_licence(vendored: dict[str, str]) -> None:
    assert {"LICENSE", "NOTICE", *ASSETS} <= set(vendored)
    for name, digest in vendored.items():
        assert hashlib.sha256((ASSETS_DIR / name).read_bytes()).hexdigest() == digest, name
    assert "Apache License" in (ASSETS_DIR / "LICENSE").read_text()


def test_docs_page_loads_only_local_assets_and_they_are_served(client: LiveServer) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    parser = _References()
    parser.feed(html)
    script_urls = re.findall(r"url: '([^']*)'", html)
    urls = parser.urls + script_urls
    assert sorted(urls) == sorted(["/docs/assets/swagger-ui.css", "/docs/assets/favicon-32x32.png",
                                   "/docs/assets/swagger-ui-bundle.js", "/openapi.json"])
    assert not re.search(r"https?://|//cdn", html)  # no absolute URL at all: nothing leaves the machine
    assert '"validatorUrl": null' in html  # the online validator badge is off
    for url in parser.urls:
        served = client.get(url)
        name = url.rsplit("/", 1)[-1]
        assert served.status_code == 200 and served.headers["content-type"].startswith(ASSETS[name])
        assert served.content == (ASSETS_DIR / name).read_bytes()
    assert client.get("/docs/assets/..%2F..%2Fapp.py").status_code == 404
    missing = client.get("/docs/assets/swagger-ui.js")
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"
    assert client.get("/redoc").status_code == 404  # ReDoc would load from a CDN: not offered


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


@pytest.mark.parametrize(("path", "media", "fields"), [
    ("/cds-services/{service_id}", "application/json", {"hook", "hookInstance", "context", "prefetch", "fhirServer"}),
    ("/cds-services/{service_id}/feedback", "application/json", {"feedback"}),
    ("/fhir/notifications", "application/fhir+json", {"resourceType", "type", "entry"}),
])
def test_request_bodies_have_schemas_that_render(client: LiveServer, path: str, media: str,
                                                 fields: set[str]) -> None:
    document = client.get("/openapi.json").json()
    for ref in refs(document):  # every reference resolves, as Swagger UI needs to render it
        assert ref.startswith("#/") and resolve(document, ref) is not None
    schema = document["paths"][path]["post"]["requestBody"]["content"][media]["schema"]
    schema = resolve(document, schema["$ref"]) if "$ref" in schema else schema
    assert fields <= set(schema["properties"])


def test_docs_work_in_a_real_browser_with_the_network_blocked(browser: Any, client: LiveServer) -> None:
    """Debian's Chromium, every request off loopback aborted: the page renders the operations and a hook
    call's request body schema from the package's own assets alone."""
    from conftest import watched_page

    with watched_page(browser, str(client.base_url)) as page:
        page.goto("/docs")
        page.wait_for_selector(".opblock-summary-path")
        paths = page.locator(".opblock-summary-path").all_text_contents()
        assert {"/cds-services/{service_id}", "/cds-services/{service_id}/feedback", "/fhir/notifications"} <= {
            p.replace("\u200b", "") for p in paths}
        page.locator(".opblock-post .opblock-summary", has_text="Call a CDS service").first.click()
        body = page.locator(".opblock-post.is-open .opblock-section-request-body")
        body.wait_for()
        shown = body.inner_text()  # the example Swagger UI builds from the request schema
        assert "hookInstance" in shown and "fhirAuthorization" in shown and "prefetch" in shown


def test_error_answers_are_documented_as_operation_outcomes(client: LiveServer) -> None:
    document = client.get("/openapi.json").json()
    call = document["paths"]["/cds-services/{service_id}"]["post"]["responses"]
    # no 422: the service never answers one
    assert {"200", "400", "401", "404", "412", "413", "415", "503"} == set(call)
    for status in ("400", "412"):
        schema = call[status]["content"]["application/fhir+json"]["schema"]
        assert schema["properties"]["resourceType"] == {"const": "OperationOutcome"}
    assert not any("422" in op.get("responses", {}) for item in document["paths"].values() for op in item.values())
    answered = client.post("/cds-services/nudges-patient-view", content=b"{not json",
                           headers={"Content-Type": "application/json"})
    assert answered.status_code == 400 and answered.json()["resourceType"] == "OperationOutcome"
