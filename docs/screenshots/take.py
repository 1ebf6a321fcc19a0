"""Screenshots of the console for the README, taken from the real pages: the service on loopback with the
bundled rules, a pinned clock and a throw-away SQLite database of synthetic cards and feedback (made up here,
no patient data), driven by Debian's Chromium through Playwright.

    .venv/bin/python docs/screenshots/take.py          # writes docs/screenshots/*.png
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from playwright.sync_api import sync_playwright

from nudges.api.app import create_app
from nudges.clock import FixedClock, parse_instant
from nudges.settings import Settings
from nudges.store import Bucket, CardRecord, FeedbackRecord, Store

HERE = Path(__file__).resolve().parent
NOW = parse_instant("2026-03-02T12:00:00Z")
RULES = ("troponin-without-cath-plan", "professional-interpreter", "colorectal-screening-navigation")
GROUPS = {  # race, ethnicity, language, payer; share of cards; chance a card is accepted
    "white": (Bucket("white", "not-hispanic-latino", "en", "private"), 0.46, 0.68),
    "black": (Bucket("black", "not-hispanic-latino", "en", "medicaid"), 0.27, 0.44),
    "hispanic": (Bucket("other", "hispanic-latino", "es", "medicaid"), 0.17, 0.55),
    "asian": (Bucket("asian", "not-hispanic-latino", "zh", "private"), 0.06, 0.62),
    "unknown": (Bucket("unknown", "unknown", "unknown", "self-pay"), 0.04, 0.5),
}


def seed(url: str) -> None:
    """Synthetic history: five months of cards for three rules, feedback drawn per group."""
    rng = random.Random(15)
    store = Store(url, FixedClock(NOW))
    store.migrate()
    for rule in RULES:
        for _i in range(420):
            name = rng.choices(list(GROUPS), [g[1] for g in GROUPS.values()])[0]
            bucket, _, accept = GROUPS[name]
            issued = NOW - timedelta(days=rng.randrange(150), hours=rng.randrange(24))
            card = str(uuid.UUID(int=rng.getrandbits(128)))
            patient = hashlib.sha256(f"{rule}-{name}-{rng.randrange(300)}".encode()).hexdigest()
            store.record_cards([CardRecord(card, "nudges-patient-view", rule, "1.0.0", "patient-view", card[:32],
                                           patient, bucket, "warning", issued)])
            roll = rng.random()
            if roll < accept:
                store.record_feedback([FeedbackRecord(card, "nudges-patient-view", "accepted",
                                                      issued + timedelta(minutes=3), ("s1",))])
            elif roll < accept + 0.25:
                store.record_feedback([FeedbackRecord(card, "nudges-patient-view", "overridden",
                                                      issued + timedelta(minutes=2), (),
                                                      "http://terminology.hl7.org/CodeSystem/"
                                                      "non-adherence-reason-codes", "risk-benefit-ratio")])
    store.dispose()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="nudges-shots-"))
    url = f"sqlite:///{work}/demo.db"
    seed(url)
    app = create_app(Settings(database_url=url, reload_interval_seconds=0, followup_poll_seconds=0,
                              public_base_url="http://127.0.0.1:8080"), FixedClock(NOW))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    shots = [("overview", "/console/", None), ("rules", "/console/rules", None),
             ("rule", "/console/rules/troponin-without-cath-plan", None),
             ("replay", "/console/replay", "#replay-summary"),
             ("audit", "/console/audit?rule=troponin-without-cath-plan&dimension=race", None)]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"))
        context = browser.new_context(viewport={"width": 1240, "height": 900})
        context.route("**/*", lambda r: r.continue_() if urlsplit(r.request.url).hostname in ("127.0.0.1", "localhost")
                      else r.abort())
        page = context.new_page()
        for name, path, wait in shots:
            page.goto(base + path)
            if wait:
                page.wait_for_selector(wait, timeout=120_000)
            page.screenshot(path=str(HERE / f"{name}.png"), full_page=name not in ("rule",))
        page.goto(base + "/console/try")
        page.select_option("#fixture", "patient-view-troponin")
        page.click("#run")
        page.wait_for_selector("#try-summary")
        page.click("article.card details.dismiss summary")
        page.screenshot(path=str(HERE / "playground.png"), full_page=True)
        page.click("label[for=tab-why]")
        page.screenshot(path=str(HERE / "explain.png"), full_page=True)
        browser.close()
    server.should_exit = True
    shutil.rmtree(work, ignore_errors=True)
    print(f"screenshots in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
