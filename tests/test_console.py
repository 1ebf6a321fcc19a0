"""The console over plain HTTP: who may reach it, form tokens, the strict CSP with nothing inline, the
playground keeping nothing, the "Why this nudge" link, reload refusals and the dashboard's suppression on
both databases. What a person sees in a browser is in test_console_browser.py."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ROOT, LiveServer
from sqlalchemy import func, select

from nudges.clock import FixedClock
from nudges.store import Bucket, CardRecord, FeedbackRecord, Store, cards

PAGES = ("/console/", "/console/rules", "/console/rules/troponin-without-cath-plan", "/console/try",
         "/console/replay", "/console/audit")
TROPONIN_CALL = ROOT / "fhir_fixtures" / "calls" / "patient-view-troponin.json"


class InlineCode(HTMLParser):
    """Anything a strict CSP would block or that needs 'unsafe-inline': inline scripts, style elements and
    attributes, event-handler attributes, javascript: URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script" and not names.get("src"):
            self.found.append("inline <script>")
        if tag == "style":
            self.found.append("<style> element")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.found.append(f"{tag} {name}=")
            if value and value.strip().lower().startswith("javascript:"):
                self.found.append(f"{tag} {name}=javascript:")


def token(client: httpx.Client, path: str = "/console/try") -> str:
    page = client.get(path)
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found, "no form token on the page"
    return found.group(1)


@pytest.fixture
def console(make_client: Callable[..., LiveServer]) -> LiveServer:
    return make_client(rules=ROOT / "rules", public_base_url="https://nudges.example.org")


def test_every_page_has_a_strict_csp_and_nothing_inline(console: LiveServer) -> None:
    for path in (*PAGES, "/console/nope"):
        response = console.get(path)
        assert response.status_code == (404 if path.endswith("nope") else 200), path
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        parser = InlineCode()
        parser.feed(response.text)
        assert not parser.found, (path, parser.found)
    # the one script is the vendored htmx 2.0.x, served by the service itself
    script = console.get("/console/static/htmx-2.0.11.min.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert 'version:"2.0.11"' in script.text.replace(" ", "")
    assert console.get("/console/static/../settings.py").status_code == 404


def test_refused_off_loopback_without_sign_in(make_client: Callable[..., LiveServer]) -> None:
    """Configured to listen beyond loopback (the API allowed unauthenticated on purpose): the console is
    still refused, and says what to configure."""
    server = make_client(host="0.0.0.0", auth={"allow_unauthenticated": True})
    response = server.get("/console/")
    assert response.status_code == 403
    assert "console.proxy_auth" in response.text and "text/html" in response.headers["content-type"]
    assert server.get("/console/rules").status_code == 403
    assert server.get("/healthz").status_code == 200  # the API is not the console


def test_a_relayed_request_is_not_a_local_user(console: LiveServer) -> None:
    assert console.get("/console/", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 403
    assert console.get("/console/", headers={"Forwarded": "for=203.0.113.9"}).status_code == 403
    assert console.get("/console/").status_code == 200


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example", 403), ("evil.example:8080", 403), ("127.0.0.1.nip.io", 403), ("attacker.localhost.evil", 403),
    ("localhost", 200), ("localhost:8080", 200), ("127.0.0.1:8080", 200), ("[::1]:8080", 200),
    ("app.localhost", 200)])
def test_dns_rebinding_is_refused(console: LiveServer, host: str, status: int) -> None:
    """A site whose name was re-pointed at 127.0.0.1 reaches the loopback console from the user's own
    browser; its requests name that site in Host, which a console without sign-in refuses."""
    assert console.get("/console/audit.csv", headers={"Host": host}).status_code == status


@pytest.fixture
def proxied(make_client: Callable[..., LiveServer]) -> LiveServer:
    return make_client(console={"proxy_auth": {"trusted_proxies": ["127.0.0.1/32"], "allowed_users": ["ana"],
                                               "allowed_groups": ["equity-leads"],
                                               "reader_groups": ["clinicians"]}})


def test_sign_in_through_a_trusted_proxy(proxied: LiveServer) -> None:
    ok = proxied.get("/console/", headers={"X-Forwarded-User": "ana"})
    assert ok.status_code == 200 and "signed in as ana" in ok.text
    grouped = proxied.get("/console/rules", headers={"X-Forwarded-User": "bo", "X-Forwarded-Groups": "x, equity-leads"})
    assert grouped.status_code == 200
    assert proxied.get("/console/", headers={"X-Forwarded-User": "eve", "X-Forwarded-Groups": "x"}).status_code == 403
    assert proxied.get("/console/").status_code == 401  # through the proxy but not signed in
    as_written = {"X-Forwarded-User": "cy", "X-Forwarded-Groups": "Equity-Leads"}  # identity providers' spelling
    assert proxied.get("/console/audit", headers=as_written).status_code == 200


def test_a_clinician_may_open_why_this_nudge_and_nothing_else(proxied: LiveServer) -> None:
    """Cards link to the rule's page ("Why this nudge") for the clinician who sees them; a reader may open
    the rule pages (no patient data) but not the dashboard, the playground or replay."""
    clinician = {"X-Forwarded-User": "dr.jones", "X-Forwarded-Groups": "staff, Clinicians"}
    page = proxied.get("/console/rules/troponin-without-cath-plan", headers=clinician)
    assert page.status_code == 200, page.text
    assert proxied.get("/console/rules", headers=clinician).status_code == 200
    css = next(m for m in re.findall(r'href="(/console/static/[^"]+)"', page.text))
    assert proxied.get(css, headers=clinician).status_code == 200
    for path in ("/console/", "/console/audit", "/console/audit.csv", "/console/try", "/console/replay"):
        refused = proxied.get(path, headers=clinician)
        assert refused.status_code == 403 and "rule pages only" in refused.text, path


async def test_the_user_header_from_an_untrusted_address_is_refused(proxied: LiveServer) -> None:
    """A client that reaches the service directly cannot name itself: same app, a peer outside the list."""
    transport = httpx.ASGITransport(app=proxied.app, client=("198.51.100.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://nudges.internal") as direct:
        response = await direct.get("/console/", headers={"X-Forwarded-User": "ana"})
    assert response.status_code == 403 and "sign-in proxy" in response.text


def test_forms_need_their_token_and_the_same_origin(console: LiveServer) -> None:
    form = {"fixture": "patient-view-troponin"}
    assert console.post("/console/try", data=form).status_code == 403  # no token
    csrf = token(console)
    assert console.post("/console/try", data={**form, "csrf": "0" * 64}).status_code == 403
    assert console.post("/console/try", data={**form, "csrf": csrf}, headers={"Origin": "https://evil.example"}
                        ).status_code == 403
    assert console.post("/console/try", data={**form, "csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}
                        ).status_code == 403
    fresh = httpx.Client(base_url=str(console.base_url))  # another browser: its own cookie, so not this token
    assert fresh.post("/console/try", data={**form, "csrf": csrf}).status_code == 403
    fresh.close()
    assert console.post("/console/try", data={**form, "csrf": csrf}).status_code == 200


def test_the_playground_stores_nothing_and_logs_no_patient_data(console: LiveServer,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    call = orjson.loads(TROPONIN_CALL.read_bytes())
    patient = call["context"]["patientId"]
    csrf = token(console)
    with console.runtime.store.engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(cards)).scalar_one()
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": r} for v in call["prefetch"].values() if v
                        for r in ([v] if v.get("resourceType") != "Bundle" else
                                  [e["resource"] for e in v.get("entry", [])])]}
    with caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, logger="nudges"):
        response = console.post("/console/try", data={"csrf": csrf, "hook": "patient-view",
                                                      "bundle": orjson.dumps(bundle).decode()})
        assert response.status_code == 200 and "Troponin above its reference range" in response.text
        feedback = console.post("/console/try/feedback", data={
            "csrf": csrf, "service": "nudges-patient-view", "card": str(uuid.uuid4()), "outcome": "overridden",
            "system": "http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes", "code": "risk-benefit-ratio"})
        assert feedback.status_code == 200 and "risk-benefit-ratio" in feedback.text
    with console.runtime.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(cards)).scalar_one() == before
    # The service's own loggers (other tests' servers may still be logging in their threads: not ours)
    ours = [r for r in caplog.records if r.name.startswith(("nudges", "uvicorn.error", "fastapi", "starlette"))]
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in ours)
    assert patient not in logged and "212" not in logged


def test_bad_playground_input_is_explained(console: LiveServer) -> None:
    csrf = token(console)
    cases = [({"hook": "patient-view", "bundle": "{not json"}, "the bundle is not JSON"),
             ({"hook": "patient-view", "bundle": '{"resourceType": "Patient"}'}, "must be a FHIR Bundle"),
             ({"hook": "order-sign", "fixture": "patient-view-troponin"}, "is a patient-view call"),
             ({"fixture": "no-such-fixture"}, "no fixture"),
             ({"hook": "patient-view", "fixture": "patient-view-troponin", "now": "yesterday"}, "400")]
    for form, message in cases:
        response = console.post("/console/try", data={**form, "csrf": csrf})
        assert response.status_code == 400 and message in response.text, (form, response.text[-800:])


def test_cards_link_to_their_rule_page_when_the_public_url_is_known(console: LiveServer,
                                                                    make_client: Callable[..., LiveServer]) -> None:
    body = TROPONIN_CALL.read_bytes()
    answer = console.post("/cds-services/nudges-patient-view", content=body,
                          headers={"Content-Type": "application/json"}).json()
    for card in answer["cards"]:
        why = [link for link in card["links"] if link["label"] == "Why this nudge"]
        assert len(why) == 1 and why[0]["type"] == "absolute"
        assert why[0]["url"].startswith("https://nudges.example.org/console/rules/")
        path = why[0]["url"].removeprefix("https://nudges.example.org")
        assert console.get(path).status_code == 200
    plain = make_client(rules=ROOT / "rules", database_url=f"sqlite:///{Path(str(console.runtime.store.url)[10:]).parent}"
                                                         "/other.db")
    cards_without = plain.post("/cds-services/nudges-patient-view", content=body,
                               headers={"Content-Type": "application/json"}).json()["cards"]
    assert cards_without and not any(link["label"] == "Why this nudge" for c in cards_without
                                     for link in c.get("links", []))


def test_overview_shows_the_last_refused_reload_with_file_and_line(client: LiveServer, rules_dir: Path) -> None:
    page = client.get("/console/")
    assert page.status_code == 200 and "pinned at 2026-03-02T12:00:00+00:00" in page.text
    assert "Last refused reload" not in page.text
    rule = rules_dir / "cardiology" / "troponin-without-cath-plan.yaml"
    rule.write_text(rule.read_text().replace("indicator: warning", "indicator: urgent", 1))
    assert client.runtime.reloader.reload() is False
    page = client.get("/console/")
    assert "Last refused reload" in page.text and "troponin-without-cath-plan.yaml:" in page.text
    assert re.search(r"troponin-without-cath-plan\.yaml:\d+:\d+: ", page.text)
    detail = client.get("/console/rules/troponin-without-cath-plan")
    assert 'class="lint-error"' in detail.text  # the problem beside its line of the file on disk
    assert "not stated" in detail.text  # the test rule set has no source attributes: defaults, not blanks
    # the page says the file on disk is not what is served, and an error's line is marked as one
    assert 'id="not-served"' in detail.text and "still serves the last good version" in detail.text
    assert 'class="has-message has-error"' in detail.text
    other = client.get("/console/rules/race-free-egfr")
    assert other.status_code == 200 and 'id="not-served"' not in other.text  # only the file refused


def test_rule_page_shows_source_attributes_and_cases(console: LiveServer) -> None:
    page = console.get("/console/rules/troponin-without-cath-plan").text
    for anchor in ("attr-developer", "attr-funding", "attr-intended-use", "attr-cautions", "attr-false-positives",
                   "attr-last-review"):
        assert f'id="{anchor}"' in page
    assert "the nudges project" in page  # from ruleset.yaml's source_attributes
    assert "nejm-racial-disparities-ebook#p1" in page and "<blockquote>" in page  # the passage, paraphrased
    assert 'class="pass">all' in page
    listing = console.get("/console/rules", params={"hook": "appointment-book"}).text
    assert "professional-interpreter" in listing and "troponin-without-cath-plan" not in listing
    assert "troponin" in console.get("/console/rules", params={"q": "cath"}).text


# -- the dashboard, on both databases ----------------------------------------------------------------------
def seed(store: Store, clock: FixedClock, rule: str) -> None:
    groups = [(Bucket("white", "not-hispanic-latino", "en", "private"), 30, 20),
              (Bucket("black", "not-hispanic-latino", "en", "medicaid"), 30, 12),
              (Bucket("asian", "not-hispanic-latino", "zh", "private"), 4, 3)]
    for bucket, count, accepted in groups:
        for i in range(count):
            card = str(uuid.uuid4())
            issued = clock.now() - timedelta(days=3 + i % 40)
            store.record_cards([CardRecord(card, "nudges-patient-view", rule, "1.0.0", "patient-view", card[:32],
                                           hashlib.sha256(f"{bucket.race}{i}".encode()).hexdigest(), bucket,
                                           "warning", issued)])
            outcome: dict[str, Any] = {"outcome": "accepted", "accepted_suggestions": ("s",)} if i < accepted else \
                {"outcome": "overridden", "override_code": "risk-benefit-ratio"}
            store.record_feedback([FeedbackRecord(card, "nudges-patient-view", outcome_timestamp=issued
                                                  + timedelta(minutes=1), **outcome)])


def test_dashboard_withholds_a_small_group_everywhere(make_client: Callable[..., LiveServer], database_url: str,
                                                      clock: FixedClock) -> None:
    server = make_client(database_url=database_url)
    rule = f"dash-{uuid.uuid4().hex[:8]}"
    seed(server.runtime.store, clock, rule)
    page = server.get("/console/audit", params={"rule": rule, "dimension": "race"})
    assert page.status_code == 200
    row = re.search(r'<tr data-group="asian" class="withheld">(.*?)</tr>', page.text, re.S)
    assert row and set(re.findall(r"<td>(.*?)</td>", row.group(1))[1:]) == {"&lt;11"}
    assert 'data-group="black" class="withheld"' in page.text  # its complement
    white = re.search(r'<tr data-group="white"[^>]*>(.*?)</tr>', page.text, re.S)
    assert white and "<td>30</td>" in white.group(1)
    assert "asian: " not in page.text  # no bar tooltip, no trend point for the small group
    csv = server.get("/console/audit.csv")
    assert csv.headers["content-disposition"].startswith("attachment")
    assert f"{rule},race,asian,<11,<11," in csv.text and f"{rule},race,black,hidden," in csv.text
    # No time window: all cards and the cards since a date, each withheld on its own, would subtract to
    # the cards between (a group too small to show among them).
    for path in ("/console/audit", "/console/audit.csv"):
        refused = server.get(path, params={"rule": rule, "since": "2026-02-01"})
        assert refused.status_code == 400 and "subtracted" in refused.text, refused.text
    assert 'name="since"' not in page.text


def test_a_pasted_record_over_a_megabyte_is_run(make_client: Callable[..., LiveServer]) -> None:
    """Starlette holds a form field to 1 MB by default; a pasted record is one field, held to
    `max_body_bytes` instead."""
    console = make_client(rules=ROOT / "rules")
    bundle = orjson.loads((ROOT / "fhir_fixtures/patients/troponin-without-cath-plan-fires.json").read_bytes())
    bundle["entry"] += [{"resource": {"resourceType": "Observation", "id": f"hr{i}", "status": "final",
                                      "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                                      "valueQuantity": {"value": 70, "unit": "/min"},
                                      "effectiveDateTime": "2026-03-01T10:00:00Z"}} for i in range(6000)]
    text = orjson.dumps(bundle).decode()
    assert len(text) > 1_100_000
    response = console.post("/console/try", data={"csrf": token(console), "hook": "patient-view", "bundle": text,
                                                  "now": "2026-03-02T12:00:00Z"})
    assert response.status_code == 200, re.findall(r'role="alert">([^<]*)', response.text)
    assert 'data-rule="troponin-without-cath-plan"' in response.text


def test_a_form_is_held_to_the_body_limit(make_client: Callable[..., LiveServer]) -> None:
    """Starlette sets no limit on a URL-encoded form: the service's own cap applies, streamed or declared."""
    console = make_client(rules=ROOT / "rules", public_base_url="https://nudges.example.org", max_body_bytes=4000)
    form = {"fixture": "patient-view-troponin", "csrf": token(console)}
    assert console.post("/console/try", data=form).status_code == 200
    response = console.post("/console/try", data={**form, "bundle": "x" * 5000})
    assert response.status_code == 413 and "exceeds 4000 bytes" in response.text

    def chunks():  # type: ignore[no-untyped-def]
        yield "&".join(f"{k}={v}" for k, v in form.items()).encode()
        for _ in range(60):
            yield b"&context=" + b"y" * 100

    streamed = console.post("/console/try", content=chunks(),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert streamed.status_code == 413


def test_small_things_a_new_user_noticed(console: LiveServer) -> None:
    """A skip link, an icon (a 404 on every page before), and an unknown rule on the dashboard said so."""
    page = console.get("/console/")
    assert 'class="skip" href="#main"' in page.text and 'id="main"' in page.text
    icon = console.get("/console/static/favicon.svg")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    unknown = console.get("/console/audit", params={"rule": "nope"})
    assert unknown.status_code == 200 and "No cards of a rule named <code>nope</code>" in unknown.text
