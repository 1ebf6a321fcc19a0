"""Managed subscriptions against a FHIR server the project did not write (sekmet-fhir, on loopback):
`nudges subscriptions plan|apply|status`, notifications authenticated per subscription by its secret,
refusals (a Subscription the server puts in error, a server that is down), stale and foreign secrets,
and missed events: detected (gaps, silence) and recovered (re-activation, then a search; or `$events`
where a server offers it, which sekmet does not: that path runs against the tests' loopback server)."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import FhirServer, LiveServer
from helpers import add_followup
from helpers import troponin as troponin_resource
from sekmet_fhir import TOPIC_URL, TROPONIN_TOPIC, Sekmet, running_sekmet, wait_for
from sqlalchemy import select

from nudges.cli import main
from nudges.clock import FixedClock
from nudges.events import followups, subscriptions
from nudges.events.subscriptions import Heard
from nudges.fhir import instant
from nudges.rules.compiler import load_ruleset
from nudges.store import Store


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sekmet]:
    with running_sekmet(tmp_path_factory.mktemp("sekmet")) as srv:
        assert srv.http.put(f"/Basic/{TROPONIN_TOPIC['id']}", json=TROPONIN_TOPIC).status_code in (200, 201)
        yield srv


@pytest.fixture
def rules_dir(rules_dir: Path) -> Path:
    add_followup(rules_dir)
    return rules_dir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Site:
    """A service on a fixed loopback port (so a restarted one is reached at the same endpoint), and the
    settings file `nudges subscriptions` reads."""

    def __init__(self, make_client: Callable[..., LiveServer], server: Sekmet, tmp_path: Path, rules_dir: Path,
                 database_url: str, topic: str = TOPIC_URL) -> None:
        self.make_client, self.port = make_client, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/fhir/notifications"
        self.settings: dict[str, Any] = {
            "database_url": database_url, "rules": str(rules_dir), "followup_poll_seconds": 0,
            "fhir_timeout_seconds": 15,  # generous: the machine may be loaded
            "delivery": {"poll_seconds": 0},
            "subscriptions": {"endpoint": self.endpoint, "check_seconds": 0,
                              "servers": [{"base": server.base, "topics": {"Observation": topic}}]}}
        self.config = tmp_path / "config.yaml"
        self.config.write_text(json.dumps(self.settings))
        self.service = self.start()

    def start(self) -> LiveServer:
        self.service = self.make_client(listen_port=self.port, **self.settings)
        return self.service

    @property
    def store(self) -> Store:
        store: Store = self.service.runtime.store
        return store

    def cli(self, *args: str) -> int:
        return main(["subscriptions", *args, "--config", str(self.config)])


@pytest.fixture
def site(make_client: Callable[..., LiveServer], server: Sekmet, tmp_path: Path, rules_dir: Path) -> Site:
    return Site(make_client, server, tmp_path, rules_dir, f"sqlite:///{tmp_path}/nudges.db")


def chart(server: Sekmet) -> str:
    pid: str = server.create({"resourceType": "Patient", "name": [{"family": "Subscribed"}]})["id"]
    return pid


def troponin(server: Sekmet, pid: str, clock: FixedClock) -> str:
    created = server.create({
        "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "89579-7"}]},
        "effectiveDateTime": instant(clock.now() - timedelta(hours=1)), "valueQuantity": {"value": 212, "unit": "ng/L"},
        "referenceRange": [{"high": {"value": 34, "unit": "ng/L"}}]})
    return str(created["id"])


def scheduled(store: Store, pid: str) -> list[Any]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(followups.followups).where(
            followups.followups.c.patient_hash == store.patient_hash(pid))))


def secret_of(server: Sekmet, managed: subscriptions.Managed) -> str:
    """sekmet shows a Subscription's channel headers (as FHIR servers may): the secret, for forged calls."""
    [header] = server.http.get(f"/Subscription/{managed.resource_id}").json()["channel"]["header"]
    return str(header.removeprefix("Authorization: Bearer "))


def note(kind: str, subscription: str, *events: tuple[int, str], since: int | None = None) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [{"name": "subscription", "valueReference": {"reference": subscription}},
                                        {"name": "topic", "valueCanonical": TOPIC_URL},
                                        {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": kind}]
    if since is not None:
        parameters.append({"name": "events-since-subscription-start", "valueString": str(since)})
    for number, focus in events:
        parameters.append({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": str(number)},
            {"name": "timestamp", "valueInstant": "2026-03-02T12:00:00Z"},
            {"name": "focus", "valueReference": {"reference": focus}}]})
    return {"resourceType": "Bundle", "type": "history", "timestamp": "2026-03-02T12:00:00Z",
            "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {"resourceType": "Parameters",
                                                                           "parameter": parameters}}]}


def test_apply_is_idempotent_and_status_compares_counts(site: Site, server: Sekmet, clock: FixedClock,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert site.cli("apply") == 0
    assert "=> active" in capsys.readouterr().out
    [managed] = subscriptions.live(site.store)
    pid = chart(server)
    troponin(server, pid, clock)
    wait_for(lambda: scheduled(site.store, pid), what="the notified follow-up")
    wait_for(lambda: subscriptions.get(site.store, managed.id).last_event == 1,  # type: ignore[union-attr]
             what="the event recorded")
    assert site.cli("status") == 0
    out = capsys.readouterr().out
    assert f"{server.base}/Subscription/{managed.resource_id}  {TOPIC_URL}" in out
    assert "status active (server: active), events: server 1, received 1" in out
    assert site.cli("apply") == 0
    assert "  keep  " in capsys.readouterr().out and len(subscriptions.live(site.store)) == 1


def test_a_subscription_the_server_refuses_is_reported_and_removed(make_client: Callable[..., LiveServer],
                                                                   server: Sekmet, tmp_path: Path, rules_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    unknown = "http://example.org/fhir/SubscriptionTopic/no-such-topic"
    site = Site(make_client, server, tmp_path, rules_dir, f"sqlite:///{tmp_path}/nudges.db", topic=unknown)
    assert site.cli("apply") == 1
    out = capsys.readouterr().out
    assert f"  create      {unknown}" in out and "=> the server put it in error:" in out
    assert subscriptions.live(site.store) == []  # its secret is refused from now on
    [retired] = subscriptions.retired(site.store, server.base)
    assert server.http.get(f"/Subscription/{retired.resource_id}").status_code in (404, 410)


def test_a_server_down_at_apply_time_changes_nothing(make_client: Callable[..., LiveServer], server: Sekmet,
                                                     tmp_path: Path, rules_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    site = Site(make_client, server, tmp_path, rules_dir, f"sqlite:///{tmp_path}/nudges.db")
    down = f"http://127.0.0.1:{free_port()}/fhir"
    site.config.write_text(json.dumps({**site.settings, "subscriptions": {
        **site.settings["subscriptions"], "servers": [{"base": down, "topics": {"Observation": TOPIC_URL}}]}}))
    assert site.cli("apply") == 2
    assert f"{down}\n  unreachable   - {down}: FHIR server unreachable (ConnectError)" in capsys.readouterr().out
    with site.store.engine.connect() as conn:
        assert conn.execute(select(subscriptions.subscriptions)).all() == []


def test_stale_foreign_and_missing_secrets_get_401_and_schedule_nothing(
        site: Site, server: Sekmet, clock: FixedClock, rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert site.cli("apply") == 0
    [managed] = subscriptions.live(site.store)
    secret = secret_of(server, managed)
    pid = chart(server)
    focus = f"{server.base}/Observation/{troponin(server, pid, clock)}"
    wait_for(lambda: scheduled(site.store, pid), what="the real notification")
    other = chart(server)
    forged = note("event-notification", f"{server.base}/Subscription/{managed.resource_id}", (9, focus))
    for headers, body in (
            ({}, forged),  # a managed subscription without its secret
            ({"Authorization": "Bearer nsub_not-a-secret-we-made"}, forged),  # unknown
            ({"Authorization": f"Bearer {secret}"},  # ours, for another subscription (foreign)
             note("event-notification", f"{server.base}/Subscription/someone-else", (1, focus)))):
        answer = site.service.post("/fhir/notifications", json=body, headers=headers)
        assert answer.status_code == 401, answer.text
        assert answer.json()["resourceType"] == "OperationOutcome"
    assert scheduled(site.store, other) == [] and subscriptions.get(site.store, managed.id).last_event == 1  # type: ignore[union-attr]

    # No rule needs it any more: apply deletes it, and its secret is stale.
    path = rules_dir / "cardiology" / "troponin-without-cath-plan.yaml"
    path.write_text(path.read_text().split("\nfollowup:")[0] + "\n")
    assert site.cli("apply") == 0
    assert "  retire  " in capsys.readouterr().out
    assert server.http.get(f"/Subscription/{managed.resource_id}").status_code in (404, 410)
    stale = site.service.post("/fhir/notifications", json=note("heartbeat", f"{server.base}/Subscription/"
                                                               f"{managed.resource_id}", since=1),
                              headers={"Authorization": f"Bearer {secret}"})
    assert stale.status_code == 401


def test_a_handshake_before_the_create_answer_is_accepted(site: Site, server: Sekmet) -> None:
    """Servers queue the handshake right after their commit: it may come before the create's answer, for a
    subscription whose id the service does not know yet. The secret says which one it is."""
    secret = subscriptions.new_secret()
    row = subscriptions.add(site.store, server=server.base, topic=TOPIC_URL, filter=None, endpoint=site.endpoint,
                            heartbeat_seconds=60, resource_types=["Observation"], secret=secret)
    answer = site.service.post("/fhir/notifications", json=note("handshake", f"{server.base}/Subscription/early",
                                                                since=0),
                               headers={"Authorization": f"Bearer {secret}"})
    assert answer.status_code == 200, answer.text
    managed = subscriptions.get(site.store, row)
    assert managed is not None and (managed.resource_id, managed.status) == ("early", "active")
    assert not subscriptions.bind(site.store, row, "another")  # the create then answering another id is caught


def test_event_numbers_tolerate_reordering_and_show_what_is_missing(make_store: Callable[..., Store],
                                                                    clock: FixedClock) -> None:
    store = make_store()
    row = subscriptions.add(store, server="https://ehr.example.org/fhir", topic=TOPIC_URL, filter=None,
                            endpoint="https://nudges.example.org/fhir/notifications", heartbeat_seconds=60,
                            resource_types=["Observation"], secret=subscriptions.new_secret())

    def heard(kind: str, *numbers: int, since: int | None = None) -> subscriptions.Managed:
        managed = subscriptions.get(store, row)
        assert managed is not None
        events = [(n, f"2026-03-02T12:00:0{n}Z") for n in numbers]
        return subscriptions.observe(store, managed, Heard(kind, "active", since, events, "2026-03-02T12:00:00Z"), "s1")

    assert heard("handshake", since=0).status == "active"
    assert heard("event-notification", 1, since=1).missing == []
    later = heard("event-notification", 3, since=3)  # 2 is still on its way, or lost
    assert (later.missing, later.last_event, later.gap_since) == ([2], 1, clock.now())
    caught = heard("event-notification", 2, since=2)
    assert (caught.missing, caught.last_event, caught.gap_since, caught.last_event_at) == ([], 3, None,
                                                                                           "2026-03-02T12:00:03Z")
    assert heard("event-notification", 2, since=3).last_event == 3  # delivered twice: counted once
    assert heard("heartbeat", since=5).missing == [4, 5]  # the server counted two that never came
    # a count far ahead (a long outage, or a hostile heartbeat) is not listed out: read at once, bounded
    started = time.perf_counter()
    far = heard("heartbeat", since=2**31 - 1).missing  # the largest a notification may carry (notifications.py)
    assert (len(far), far[0], far[-1], far[:3]) == (2**31 - 1 - 3, 4, 2**31 - 1, [4, 5, 6])
    assert time.perf_counter() - started < 1


def test_missed_events_are_recovered_after_the_server_gave_up(site: Site, server: Sekmet, clock: FixedClock) -> None:
    """The service is down when an event is sent: the server marks the subscription `error`, and sends
    nothing (and counts nothing) while it stays so. Back up, the service notices the silence, re-activates
    the subscription and finds what it missed by searching."""
    assert site.cli("apply") == 0
    [managed] = subscriptions.live(site.store)
    first, missed, unsent = chart(server), chart(server), chart(server)
    troponin(server, first, clock)
    wait_for(lambda: scheduled(site.store, first), what="the first follow-up")
    site.service.stop()
    troponin(server, missed, clock)  # delivery fails: the subscription goes to error
    wait_for(lambda: server.http.get(f"/Subscription/{managed.resource_id}").json()["status"] == "error",
             what="the server to give up")
    troponin(server, unsent, clock)  # never sent, never counted
    service = site.start()
    clock.advance(seconds=60 * 3 + 1)  # three heartbeat periods of silence
    [outcome] = service.on_loop(service.runtime.recovery.check())
    assert outcome.outcome == "recovered" and outcome.detail.startswith("search:"), outcome
    assert scheduled(site.store, missed) and scheduled(site.store, unsent)
    assert len(scheduled(site.store, first)) == 1  # found again, scheduled once
    recovered = subscriptions.get(site.store, managed.id)
    assert recovered is not None and (recovered.status, recovered.last_event, recovered.missing) == ("active", 2, [])
    wait_for(lambda: server.http.get(f"/Subscription/{managed.resource_id}").json()["status"] == "active",
             what="the re-activation handshake")
    metrics = service.get("/metrics").text
    assert 'nudges_subscription_recoveries_total{method="search",result="ok"} 1.0' in metrics
    assert service.on_loop(service.runtime.recovery.check()) == [type(outcome)(managed.id, "ok")]


def test_a_gap_is_degraded_after_the_grace_period_and_stays_so_while_recovery_fails(
        make_client: Callable[..., LiveServer], tmp_path: Path, rules_dir: Path, clock: FixedClock) -> None:
    service = make_client(followup_poll_seconds=0, subscriptions={"check_seconds": 0, "gap_grace_seconds": 60})
    down = f"http://127.0.0.1:{free_port()}/fhir"
    secret = subscriptions.new_secret()
    row = subscriptions.add(service.runtime.store, server=down, topic=TOPIC_URL, filter=None,
                            endpoint="http://127.0.0.1/fhir/notifications", heartbeat_seconds=60,
                            resource_types=["Observation"], secret=secret)
    for body in (note("handshake", f"{down}/Subscription/s1", since=0),
                 note("heartbeat", f"{down}/Subscription/s1", since=2)):
        assert service.post("/fhir/notifications", json=body, headers={"Authorization": f"Bearer {secret}"}
                            ).status_code == 200
    check = service.runtime.recovery.check
    assert [o.outcome for o in service.on_loop(check())] == ["ok"]  # may still be on its way
    clock.advance(seconds=60)
    [failed] = service.on_loop(check())
    assert failed.outcome == "failed" and "unreachable" in failed.detail
    managed = subscriptions.get(service.runtime.store, row)
    assert managed is not None and managed.status == "degraded" and managed.missing == [1, 2]
    assert managed.reason is not None and managed.reason.startswith("2 event(s) missing (1..2); recovery failed")
    ready = service.get("/readyz").json()
    assert ready["subscriptions"]["degraded"] == 1 and any("degraded" in w for w in ready["warnings"])
    assert "nudges_subscription_missed_events_total 2.0" in service.get("/metrics").text


def test_missed_events_come_back_by_events_where_the_server_offers_it(
        make_client: Callable[..., LiveServer], fhir_server: FhirServer, clock: FixedClock) -> None:
    """Event 2 of 3 never arrives: past the grace period the service asks `$events` for exactly the
    numbers it lacks, reads the focus it names (id-only) and schedules its follow-up; the rest is untouched."""
    service = make_client(followup_poll_seconds=0, subscriptions={"check_seconds": 0, "gap_grace_seconds": 60})
    store = service.runtime.store
    for n in (1, 2, 3):
        fhir_server.resources.append({**troponin_resource(f"obs-{n}", when=instant(clock.now() - timedelta(hours=1))),
                                      "subject": {"reference": f"Patient/pt-events-{n}"}})
    status = {"resourceType": "Parameters", "parameter": [
        {"name": "status", "valueCode": "active"}, {"name": "events-since-subscription-start", "valueString": "3"}]}
    fhir_server.operations["/fhir/Subscription/s1/$status"] = {
        "resourceType": "Bundle", "type": "searchset", "entry": [{"resource": status}]}
    fhir_server.operations["/fhir/Subscription/s1/$events"] = note(
        "query-event", f"{fhir_server.base}/Subscription/s1", (2, "Observation/obs-2"), since=3)
    secret = subscriptions.new_secret()
    row = subscriptions.add(store, server=fhir_server.base, topic=TOPIC_URL, filter=None,
                            endpoint="http://127.0.0.1/fhir/notifications", heartbeat_seconds=60,
                            resource_types=["Observation"], secret=secret)
    subscription = f"{fhir_server.base}/Subscription/s1"
    for body in (note("handshake", subscription, since=0),
                 note("event-notification", subscription, (1, "Observation/obs-1"), since=1),
                 note("event-notification", subscription, (3, "Observation/obs-3"), since=3)):
        assert service.post("/fhir/notifications", json=body, headers={"Authorization": f"Bearer {secret}"}
                            ).status_code == 200
    assert [bool(scheduled(store, f"pt-events-{n}")) for n in (1, 2, 3)] == [True, False, True]
    clock.advance(seconds=61)
    [outcome] = service.on_loop(service.runtime.recovery.check())
    assert (outcome.outcome, outcome.detail) == ("recovered", "$events: 1 resource(s), 1 scheduled"), outcome
    asked = [path for path, _ in fhir_server.requests if "$events" in path]
    assert asked == ["/fhir/Subscription/s1/$events?eventsSinceNumber=2&eventsUntilNumber=3&content=id-only"]
    assert [len(scheduled(store, f"pt-events-{n}")) for n in (1, 2, 3)] == [1, 1, 1]
    managed = subscriptions.get(store, row)
    assert managed is not None and (managed.status, managed.last_event, managed.missing) == ("active", 3, [])
    assert 'nudges_subscription_recoveries_total{method="$events",result="ok"} 1.0' in service.get("/metrics").text


def test_with_cds_clients_configured_a_subscription_secret_is_enough(make_client: Callable[..., LiveServer],
                                                                     tmp_path: Path) -> None:
    """A FHIR server cannot sign a CDS client's JWT: its subscription's secret authenticates it, while
    everything else (a relayed notification without a JWT) still needs the JWT."""
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": []}))
    clients = [{"iss": "https://ehr.example.org", "jwks_file": str(tmp_path / "jwks.json")}]
    service = make_client(auth={"clients": clients})
    secret = subscriptions.new_secret()
    subscriptions.add(service.runtime.store, server="https://ehr.example.org/fhir", topic=TOPIC_URL, filter=None,
                      endpoint="https://nudges.example.org/fhir/notifications", heartbeat_seconds=60,
                      resource_types=["Observation"], secret=secret)
    handshake = note("handshake", "https://ehr.example.org/fhir/Subscription/s1", since=0)
    assert service.post("/fhir/notifications", json=handshake,
                        headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    unmanaged = note("handshake", "https://ehr.example.org/fhir/Subscription/someone", since=0)
    assert service.post("/fhir/notifications", json=unmanaged).status_code == 401
    assert service.post("/cds-services/nudges-patient-view", json={},
                        headers={"Authorization": f"Bearer {secret}"}).status_code == 401  # only for notifications


def test_the_plan_maps_start_clauses_to_each_servers_topics(rules_dir: Path) -> None:
    from nudges.events.subscriber import plan
    from nudges.settings import Settings

    ruleset = load_ruleset(rules_dir).ruleset
    assert ruleset is not None
    servers = [{"base": "https://a.example.org/fhir", "topics": {"Observation": "https://a/topic/obs",
                                                                  "Observation:troponin": "https://a/topic/trop"},
                "filters": {"https://a/topic/trop": "Observation?category=laboratory"}},
               {"base": "https://b.example.org/fhir/", "topics": {"Encounter": "https://b/topic/enc"}}]
    found = plan(ruleset.rules, Settings(public_base_url="https://nudges.example.org",
                                         subscriptions={"servers": servers}))
    assert found.endpoint == "https://nudges.example.org/fhir/notifications"
    assert [(w.server, w.topic, w.filter, w.types, w.rules) for w in found.wanted] == [
        ("https://a.example.org/fhir", "https://a/topic/trop", "Observation?category=laboratory", ("Observation",),
         ("troponin-without-cath-plan",))]
    assert found.problems == ["https://b.example.org/fhir/: no SubscriptionTopic for Observation (rule "
                              "troponin-without-cath-plan): add subscriptions.servers[1].topics.Observation"]
    assert plan(ruleset.rules, Settings()).problems[0].startswith("set subscriptions.endpoint (or public_base_url)")


def test_the_console_shows_the_outbox_and_degraded_subscriptions(make_client: Callable[..., LiveServer],
                                                                  clock: FixedClock) -> None:
    service = make_client(followup_poll_seconds=0, subscriptions={"check_seconds": 0, "gap_grace_seconds": 0})
    down = f"http://127.0.0.1:{free_port()}/fhir"
    secret = subscriptions.new_secret()
    subscriptions.add(service.runtime.store, server=down, topic=TOPIC_URL, filter=None, endpoint="http://x/fhir",
                      heartbeat_seconds=60, resource_types=["Observation"], secret=secret)
    service.post("/fhir/notifications", json=note("heartbeat", f"{down}/Subscription/s9", since=3),
                 headers={"Authorization": f"Bearer {secret}"})
    service.on_loop(service.runtime.recovery.check())
    page = service.get("/console/")
    assert page.status_code == 200
    assert "Outbox: 0 pending, 0 sending, 0 sent, 0 failed, 0 dead" in page.text
    assert f"{down}/Subscription/s9" in page.text and "degraded: 3 event(s) missing (1..3)" in page.text
    assert "3 missing" in page.text
