"""The console in a real browser (Debian's Chromium through Playwright): every page, the playground on each
of the six hooks, Dismiss sending feedback, the raw JSON tab, the explain trace, a suppressed cell on the
dashboard. One browser per session, one server per module; nothing but loopback is reachable, and any
Content-Security-Policy violation fails the test."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import NOW, ROOT, LiveServer, watched_page

from nudges.clock import FixedClock, parse_instant
from nudges.settings import Settings
from nudges.store import Bucket, CardRecord, FeedbackRecord

CALLS = ROOT / "fhir_fixtures" / "calls"
HOOKS = ("patient-view", "encounter-start", "encounter-discharge", "order-select", "order-sign", "appointment-book")


def fixture_for(hook: str) -> Path:
    return sorted(p for p in CALLS.glob(f"{hook}-*.json") if not p.name.endswith((".golden.json", ".server.json"))
                  and json.loads(p.read_text())["hook"] == hook)[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("console")
    settings = Settings(rules=ROOT / "rules", database_url=f"sqlite:///{folder}/nudges.db", reload_interval_seconds=0,
                        followup_poll_seconds=0)
    live = LiveServer(settings, FixedClock(parse_instant(NOW)))
    seed_dashboard(live)
    yield live
    live.stop()


def seed_dashboard(live: LiveServer) -> None:
    """A rule with two large groups and a small one (4 patients): the small one must stay withheld."""
    store, now = live.runtime.store, live.runtime.clock.now()
    for race, count in (("white", 24), ("black", 22), ("asian", 4)):
        for i in range(count):
            card = str(uuid.uuid4())
            issued = now - timedelta(days=2 + i)
            store.record_cards([CardRecord(card, "nudges-patient-view", "troponin-without-cath-plan", "1.0.0",
                                           "patient-view", card[:32], hashlib.sha256(f"{race}{i}".encode()).hexdigest(),
                                           Bucket(race, "not-hispanic-latino", "en", "private"), "warning", issued)])
            store.record_feedback([FeedbackRecord(card, "nudges-patient-view", "accepted" if i % 3 else "overridden",
                                                  issued + timedelta(minutes=2), ("s",) if i % 3 else ())])


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    with watched_page(browser, str(server.base_url), viewport={"width": 1280, "height": 900}) as tab:
        yield tab


def test_overview(page: Any, server: LiveServer) -> None:
    page.goto("/console/")
    assert page.text_content("#ruleset-name") == "nudges-equity"
    assert page.text_content("#ruleset-version").startswith(server.runtime.services().ruleset.version[:5])
    assert "pinned at 2026-03-02T12:00:00" in page.text_content("#clock")
    assert "sqlite" in page.text_content("#database")
    assert page.locator("#services tbody tr").count() == 6


def test_rules_filter_as_you_type(page: Any) -> None:
    page.goto("/console/rules")
    total = page.locator("table.rules tbody tr").count()
    assert total >= 20
    page.fill("#q", "interpreter")
    page.wait_for_url("**q=interpreter**")  # htmx swapped the table and pushed the filter into the address bar
    ids = page.locator("table.rules tbody tr").evaluate_all("rows => rows.map(r => r.dataset.rule)")
    assert ids and len(ids) < total and all("interpreter" in i for i in ids)
    page.click("text=professional-interpreter")
    page.wait_for_selector("#source-attributes")
    assert "the nudges project" in page.text_content("#attr-developer")


def test_rule_page(page: Any) -> None:
    page.goto("/console/rules/race-free-egfr")
    assert page.text_content("#rule-title")
    assert page.locator("#cases .pass").count() >= 1
    assert page.locator("table.source-lines tr").count() > 20  # the YAML, line by line
    assert page.locator("#citations li").count() >= 1


@pytest.mark.parametrize("hook", HOOKS)
def test_playground_on_every_hook(page: Any, hook: str) -> None:
    call = fixture_for(hook)
    golden = json.loads(call.with_name(call.name.replace(".json", ".golden.json")).read_text())
    page.goto("/console/try")
    page.select_option("#fixture", call.stem)
    page.fill("#now", golden["now"])
    page.click("#run")
    page.wait_for_selector("#try-summary")
    assert page.text_content("#try-summary").startswith(hook)
    summaries = page.locator("#panel-cards article.card h3.summary").all_text_contents()
    assert summaries == [c["summary"] for c in golden["cards"]]
    page.click("label[for=tab-json]")
    assert page.is_visible("#raw-json") and not page.is_visible("#panel-cards")
    raw = json.loads(page.text_content("#raw-json"))
    assert [c["summary"] for c in raw["cards"]] == summaries


def test_pasted_bundle_and_dismiss_with_a_reason_sends_feedback(page: Any) -> None:
    bundle = json.loads((ROOT / "fhir_fixtures" / "patients" / "troponin-without-cath-plan-fires.json").read_text())
    page.goto("/console/try")
    page.select_option("#hook", "patient-view")
    page.fill("#bundle", json.dumps(bundle))
    page.fill("#now", "2026-03-02T12:00:00Z")
    page.click("#run")
    page.wait_for_selector("article.card[data-rule=troponin-without-cath-plan]")
    card = page.locator("article.card[data-rule=troponin-without-cath-plan]")
    card.locator("details.dismiss summary").click()
    reason = card.locator("details.dismiss button.reason").first
    label = reason.text_content()
    reason.click()
    card.locator(".feedback-sent").wait_for()
    sent = json.loads(card.locator(".feedback-sent pre").text_content())
    entry = sent["feedback"][0]
    assert entry["outcome"] == "overridden" and entry["card"] == card.get_attribute("data-card")
    assert entry["overrideReason"]["reason"]["display"] == label.strip()
    card.locator("button.suggestion").first.click()
    card.locator(".feedback-sent pre", has_text="acceptedSuggestions").wait_for()


def test_a_refused_run_shows_why_where_the_cards_go(browser: Any, server: LiveServer) -> None:
    """htmx 2 swaps no 4xx answer by default: a bad paste showed nothing at all (only the browser's
    console said 400). And order-select from a patient's bundle names what it lacks; draft orders given
    as a list (as rule cases write them) are taken."""
    with watched_page(browser, str(server.base_url), allow=("status of 400",)) as page:
        page.goto("/console/try")
        page.select_option("#hook", "patient-view")
        page.fill("#bundle", '{"resourceType": "Bundle", "entry": [')
        page.click("#run")
        error = page.wait_for_selector("#result [role=alert]")
        assert "400" in (error.text_content() or "") and "JSON" in (error.text_content() or "")
        bundle = (ROOT / "fhir_fixtures" / "patients" / "race-free-egfr-fires.json").read_text()
        page.select_option("#hook", "order-select")
        page.fill("#bundle", bundle)
        page.click("#run")
        page.wait_for_selector("#result [role=alert]:has-text('draftOrders')")
        order = {"resourceType": "ServiceRequest", "id": "egfr-order", "status": "draft", "intent": "order",
                 "subject": {"reference": "Patient/pt-egfr-fires"},
                 "code": {"coding": [{"system": "http://loinc.org", "code": "48643-1"}]}}
        page.fill("#context", json.dumps({"draftOrders": [order]}))
        page.click("#run")  # and the form still works after an error
        page.wait_for_selector("#try-summary")


def test_explain_tab(page: Any) -> None:
    page.goto("/console/try?fixture=patient-view-troponin")
    page.click("#run")
    page.wait_for_selector("#try-summary")
    page.click("label[for=tab-why]")
    assert page.is_visible("#panel-why")
    fired = page.locator(".explain-rule.fired").evaluate_all("els => els.map(e => e.dataset.rule)")
    assert "troponin-without-cath-plan" in fired
    quiet = page.locator(".explain-rule.quiet").first
    assert quiet.locator(".reason").text_content().strip()  # why it did not fire, in one sentence
    quiet.locator("summary").first.click()
    assert quiet.locator("li.step").count() >= 1  # and the steps, as a tree


def test_replay(page: Any) -> None:
    page.goto("/console/replay")
    page.wait_for_selector("#replay-summary", timeout=180_000)
    rows = page.locator("table.replay tbody tr[data-call]")
    assert rows.count() == len([p for p in CALLS.glob("*.json") if not p.name.endswith((".golden.json",
                                                                                       ".server.json"))])
    assert "match their golden files" in page.text_content("#replay-summary")


def test_dashboard_withholds_the_small_group(page: Any) -> None:
    page.goto("/console/audit?rule=troponin-without-cath-plan&dimension=race")
    section = page.locator("#rule-troponin-without-cath-plan")
    asian = section.locator("table.stats tr[data-group=asian]")
    assert set(asian.locator("td").all_text_contents()[1:]) == {"<11"}
    assert section.locator("table.stats tr[data-group=white] td").nth(1).text_content() == "24"
    reasons = section.locator("details.reasons[data-reasons=race]")
    reasons.locator("summary").click()
    assert "<11" in reasons.locator("tr[data-group=asian]").text_content()  # its override reasons withheld too
    svg = section.locator("svg.chart").first.inner_html()
    assert "&lt;11 (withheld)" in svg and "asian:" not in svg  # a label, no bar, no tooltip numbers
    with page.expect_download() as download:
        page.click("#csv")
    text = Path(download.value.path()).read_text()
    assert "troponin-without-cath-plan,race,asian,<11,<11,<11" in text
