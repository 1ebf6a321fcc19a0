"""Between visits through the real HTTP app, real databases and a real loopback FHIR server: FHIR
Subscription notifications, follow-ups run at an injected clock, pending cards surfacing once."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, FhirServer, LiveServer
from helpers import assert_valid_card, bundle, patient, patient_view, troponin
from sqlalchemy import select

from nudges.clock import FixedClock
from nudges.events import followups
from nudges.events.followups import claim_due, complete, pending_cards, schedule
from nudges.rules.compiler import load_ruleset
from nudges.store import Bucket, CardRecord, Store, cards, feedback

NOTIFY = "/fhir/notifications"
RULE = "troponin-without-cath-plan"
SUBSCRIPTION = "https://ehr.example.org/fhir/Subscription/troponin-results"


def status(kind: str, *focus: str, subscription: str = SUBSCRIPTION) -> dict[str, Any]:
    """The SubscriptionStatus (R4 Backport IG) as the first entry's Parameters resource."""
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": subscription}},
        {"name": "topic", "valueCanonical": "http://example.org/SubscriptionTopic/lab-results"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(len(focus))},
    ]
    for number, reference in enumerate(focus, start=1):
        parameters.append({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": str(number)},
            {"name": "timestamp", "valueInstant": "2026-03-02T12:00:00Z"},
            {"name": "focus", "valueReference": {"reference": reference}}]})
    return {"resourceType": "Parameters", "id": str(uuid.uuid4()), "parameter": parameters}


def notification(kind: str, *focus: str, entries: tuple[dict[str, Any], ...] = (),
                 subscription: str = SUBSCRIPTION) -> dict[str, Any]:
    first = {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": status(kind, *focus, subscription=subscription),
             "request": {"method": "GET", "url": "Subscription/troponin-results/$status"},
             "response": {"status": "200"}}
    return {"resourceType": "Bundle", "type": "history", "timestamp": "2026-03-02T12:00:00Z",
            "entry": [first, *entries]}


def new_patient() -> str:
    return f"pt-{uuid.uuid4().hex[:12]}"  # unique: the PostgreSQL schema is shared by the session


def result_for(pid: str, oid: str = "trop-1", when: str = "2026-03-02T11:00:00Z") -> dict[str, Any]:
    """An elevated troponin resulted an hour before the notification (12:00)."""
    return {**troponin(oid, when=when), "subject": {"reference": f"Patient/{pid}"}}


def cath_order(pid: str) -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "id": f"cath-{pid}", "status": "active", "intent": "order",
            "subject": {"reference": f"Patient/{pid}"}, "authoredOn": "2026-03-02T18:00:00Z",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "41976001"}]}}


def full_resource(base: str, *resources: dict[str, Any]) -> dict[str, Any]:
    urls = [f"{base}/{r['resourceType']}/{r['id']}" for r in resources]
    entries = tuple({"fullUrl": url, "resource": r, "request": {"method": "PUT", "url": url},
                     "response": {"status": "201"}} for url, r in zip(urls, resources, strict=True))
    return notification("event-notification", *urls, entries=entries)


def empty_prefetch(client: LiveServer, service_id: str) -> dict[str, Any]:
    """Every prefetch key the service asks for, with no data."""
    services = client.get("/cds-services").json()["services"]
    return {key: None for key in next(s["prefetch"] for s in services if s["id"] == service_id)}


def quiet_view(client: LiveServer, pid: str) -> dict[str, Any]:
    """A patient-view call whose own data fires nothing."""
    return patient_view(pid, prefetch={**empty_prefetch(client, "nudges-patient-view"), "patient": patient(pid)})


def troponin_cards(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [c for c in response.json()["cards"] if c["summary"].startswith("Troponin")]


def followup_rows(runtime: Any, pid: str) -> list[Any]:
    store = runtime.store
    with store.engine.connect() as conn:
        return list(conn.execute(select(followups.followups)
                                 .where(followups.followups.c.patient_hash == store.patient_hash(pid))))


FOLLOWUP = "followup:\n  start: troponin\n  after: 12h\n"


@pytest.fixture
def rules_dir(rules_dir: Path) -> Path:
    """The frozen test rules, with the follow-up the shipped troponin rule declares."""
    path = rules_dir / "cardiology" / f"{RULE}.yaml"
    text = path.read_text()
    if "\nfollowup:" not in text:
        path.write_text(text.rstrip("\n") + "\n" + FOLLOWUP)
    return rules_dir


@pytest.fixture
def service(make_client: Callable[..., LiveServer], database_url: str) -> LiveServer:
    # The background job is off: tests run the due follow-ups themselves at the pinned clock.
    return make_client(database_url=database_url, followup_poll_seconds=0)


# -- intake ------------------------------------------------------------------------------------------------
def test_handshake_and_heartbeat_are_acknowledged_and_nothing_else(service: LiveServer) -> None:
    for kind in ("handshake", "heartbeat"):
        response = service.post(NOTIFY, json=notification(kind))
        assert response.status_code == 200, response.text
        assert response.json() == {"type": kind, "events": 0, "scheduled": 0}
    assert service.run_due() == []


def test_full_resource_notification_schedules_once(service: LiveServer, fhir_server: FhirServer) -> None:
    pid = new_patient()
    body = full_resource(fhir_server.base, result_for(pid))
    response = service.post(NOTIFY, json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"type": "event-notification", "events": 1, "scheduled": 1}
    assert service.post(NOTIFY, json=body).json()["scheduled"] == 0  # the same event again
    [row] = followup_rows(service.runtime, pid)
    assert (row.rule_id, row.status, row.patient_ref, row.start_ref) == (RULE, "pending", pid, "Observation/trop-1")
    assert row.fhir_server == fhir_server.base
    assert followups.aware(row.due_at) == service.runtime.clock.now() + timedelta(hours=12)
    assert fhir_server.requests == []  # full-resource: nothing read back


def test_a_start_clause_may_use_the_documented_context_variables(
        make_client: Callable[..., LiveServer], rules_dir: Path, fhir_server: FhirServer) -> None:
    """%patientId in a follow-up's start clause passes lint, so it must evaluate at intake (it was a 500)."""
    path = rules_dir / "cardiology" / f"{RULE}.yaml"
    text = path.read_text()
    old = "      where: \"(value as Quantity).value > referenceRange.high.value or"
    assert old in text
    path.write_text(text.replace(old, "      where: \"subject.reference = 'Patient/' + %patientId and "
                                      "(value as Quantity).value > referenceRange.high.value or", 1))
    service = make_client(followup_poll_seconds=0)
    pid = new_patient()
    response = service.post(NOTIFY, json=full_resource(fhir_server.base, result_for(pid)))
    assert response.status_code == 200, response.text
    assert response.json()["scheduled"] == 1


def test_resources_that_start_nothing_schedule_nothing(service: LiveServer, fhir_server: FhirServer) -> None:
    pid = new_patient()
    normal = {**result_for(pid, "trop-normal"), "valueQuantity": {"value": 5, "unit": "ng/L"}}
    orphan = {**result_for(pid, "trop-orphan")}
    del orphan["subject"]
    response = service.post(NOTIFY, json=full_resource(fhir_server.base, normal, orphan, cath_order(pid)))
    assert response.status_code == 200, response.text
    assert response.json()["scheduled"] == 0
    assert followup_rows(service.runtime, pid) == []


def test_id_only_notification_reads_the_focus_from_the_server(service: LiveServer, fhir_server: FhirServer) -> None:
    pid = new_patient()
    fhir_server.resources = [result_for(pid)]
    body = notification("event-notification", f"{fhir_server.base}/Observation/trop-1",
                        f"{fhir_server.base}/Encounter/enc-1",
                        entries=({"fullUrl": f"{fhir_server.base}/Observation/trop-1",
                                  "request": {"method": "PUT", "url": "Observation/trop-1"},
                                  "response": {"status": "200"}},))
    response = service.post(NOTIFY, json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"type": "event-notification", "events": 2, "scheduled": 1}
    # Only what a follow-up can start from is read: no rule starts from an Encounter.
    assert [path for path, _ in fhir_server.requests] == ["/fhir/Observation/trop-1"]
    assert followup_rows(service.runtime, pid)[0].fhir_server == fhir_server.base


def test_id_only_relative_reference_uses_the_configured_server(make_client: Callable[..., LiveServer],
                                                               fhir_server: FhirServer) -> None:
    subscription = "Subscription/relative-one"
    client = make_client(followup_poll_seconds=0, subscription_servers={subscription: fhir_server.base})
    pid = new_patient()
    fhir_server.resources = [result_for(pid)]
    response = client.post(NOTIFY, json=notification("event-notification", "Observation/trop-1",
                                                     subscription=subscription))
    assert response.status_code == 200, response.text
    assert response.json()["scheduled"] == 1
    assert [path for path, _ in fhir_server.requests] == ["/fhir/Observation/trop-1"]


def test_id_only_notification_from_an_unreachable_server_is_412(service: LiveServer) -> None:
    response = service.post(NOTIFY, json=notification("event-notification", "http://127.0.0.1:9/fhir/Observation/x"))
    assert response.status_code == 412  # so the FHIR server delivers it again
    assert response.json()["resourceType"] == "OperationOutcome"


MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({"resourceType": "Parameters"}, "must be a FHIR Bundle"),
    ({"resourceType": "Bundle", "type": "searchset", "entry": []}, "type 'history'"),
    ({"resourceType": "Bundle", "type": "history", "entry": []}, "Bundle.entry"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": patient()}]}, "Parameters resource"),
    (notification("query-status"), "unsupported notification type"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [{"name": "type", "valueCode": "heartbeat"}]}}]}, "subscription"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": SUBSCRIPTION}},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "notification-event", "part": [{"name": "focus", "valueReference": {}}]}]}}]},
     "focus needs a reference"),
    (notification("event-notification", "not a reference"), "neither in the Bundle"),
    (notification("event-notification", "Observation/x", subscription="Subscription/unknown"),
     "which FHIR server"),
    (notification("event-notification", "http://10.1.2.3/fhir/Observation/x"), "https"),
    # shapes a careless or hostile sender gives: a 400, not a 500 (or a replica hung on a count)
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [{"name": "subscription", "valueReference": SUBSCRIPTION},
                                                    {"name": "type", "valueCode": "heartbeat"}]}}]}, "subscription"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": SUBSCRIPTION}},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "notification-event", "part": [{"name": "focus", "valueReference": "Observation/x"}]}]}}]},
     "focus needs a reference"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": SUBSCRIPTION}},
            {"name": "type", "valueCode": "heartbeat"},
            {"name": "events-since-subscription-start", "valueString": "99999999999999999999999999"}]}}]},
     "is not an event number"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": SUBSCRIPTION}},
            {"name": "type", "valueCode": "heartbeat"},
            {"name": "events-since-subscription-start", "valueString": "2147483648"}]}}]},  # past INTEGER
     "is not an event number"),
]


def test_malformed_notifications_are_400(client: LiveServer) -> None:
    for body, expected in MALFORMED:
        response = client.post(NOTIFY, json=body)
        assert response.status_code == 400, (expected, response.text)
        assert response.headers["content-type"].startswith("application/fhir+json")
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert expected in outcome["issue"][0]["diagnostics"], (expected, outcome)
    response = client.post(NOTIFY, content=b"{nope", headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


# -- follow-ups ---------------------------------------------------------------------------------------------
def test_followup_fires_after_its_delay_and_surfaces_once(service: LiveServer, fhir_server: FhirServer,
                                                          clock: FixedClock) -> None:
    pid = new_patient()
    fhir_server.resources = [patient(pid), result_for(pid)]
    assert service.post(NOTIFY, json=full_resource(fhir_server.base, result_for(pid))).json()["scheduled"] == 1
    scheduler = service
    [row] = followup_rows(service.runtime, pid)

    clock.advance(hours=11, minutes=59)
    assert all(o.id != row.id for o in scheduler.run_due())  # not due yet
    assert not any(p.startswith("/fhir/Observation?") for p, _ in fhir_server.requests)
    clock.advance(minutes=1)
    assert [o.outcome for o in scheduler.run_due() if o.id == row.id] == ["fired"]
    [row] = followup_rows(service.runtime, pid)
    assert (row.status, row.patient_ref, row.attempts) == ("done", None, 1)  # the patient id is purged
    assert any(p.startswith(f"/fhir/Observation?patient={pid}") for p, _ in fhir_server.requests)
    assert all(o.id != row.id for o in scheduler.run_due())  # done: never run again

    # The next hook call for this patient, whatever its own data, shows the card once.
    first = service.post("/cds-services/nudges-patient-view", json=quiet_view(service, pid))
    [card] = troponin_cards(first)
    assert_valid_card(card)
    assert "13 h ago" in card["summary"]
    assert card["suggestions"][0]["actions"][0]["resource"]["subject"]["reference"] == f"Patient/{pid}"
    assert troponin_cards(service.post("/cds-services/nudges-patient-view", json=quiet_view(service, pid))) == []

    with service.runtime.store.engine.connect() as conn:
        issued = conn.execute(select(cards).where(cards.c.uuid == card["uuid"])).one()
        kept = conn.execute(select(pending_cards).where(pending_cards.c.uuid == card["uuid"])).one()
    assert (issued.service_id, issued.hook, issued.rule_id) == ("nudges-patient-view", "followup", RULE)
    assert issued.patient_hash == service.runtime.store.patient_hash(pid)
    assert kept.delivered_at is not None and kept.card == {}  # the card text is not kept once shown

    # Feedback on the delivered card goes to the service that showed it, and is stored once.
    body = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-03-03T00:05:00Z",
                          "overrideReason": {"reason": {"system": "http://terminology.hl7.org/CodeSystem/"
                                                        "non-adherence-reason-codes",
                                                        "code": "indication-order-exists"}}}]}
    response = service.post("/cds-services/nudges-patient-view/feedback", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"stored": 1, "duplicates": 0}
    assert service.post("/cds-services/nudges-patient-view/feedback", json=body).json()["stored"] == 0
    with service.runtime.store.engine.connect() as conn:
        stored = conn.execute(select(feedback).where(feedback.c.card_uuid == card["uuid"])).all()
    assert [(f.outcome, f.override_code) for f in stored] == [("overridden", "indication-order-exists")]


def test_followup_does_not_fire_when_the_order_appeared(service: LiveServer, fhir_server: FhirServer,
                                                        clock: FixedClock) -> None:
    pid = new_patient()
    fhir_server.resources = [patient(pid), result_for(pid)]
    assert service.post(NOTIFY, json=full_resource(fhir_server.base, result_for(pid))).json()["scheduled"] == 1
    fhir_server.resources.append(cath_order(pid))  # placed six hours later
    clock.advance(hours=12)
    [row] = followup_rows(service.runtime, pid)
    assert [o.outcome for o in service.run_due() if o.id == row.id] == ["quiet"]
    [row] = followup_rows(service.runtime, pid)
    assert (row.status, row.patient_ref) == ("done", None)
    assert troponin_cards(service.post("/cds-services/nudges-patient-view", json=quiet_view(service, pid))) == []


def test_pending_card_is_ordered_with_the_others_on_any_hook(service: LiveServer, fhir_server: FhirServer,
                                                             clock: FixedClock) -> None:
    pid = new_patient()
    fhir_server.resources = [result_for(pid)]
    service.post(NOTIFY, json=full_resource(fhir_server.base, result_for(pid)))
    clock.advance(hours=12)
    service.run_due()
    speaks_vietnamese = patient(pid, communication=[{"language": {"coding": [{"system": "urn:ietf:bcp:47",
                                                                              "code": "vi"}]}, "preferred": True}])
    prefetch = empty_prefetch(service, "nudges-encounter-start")
    prefetch.update(patient=speaks_vietnamese, observation=bundle(result_for(pid)))
    body = {"hook": "encounter-start", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/dr-2", "patientId": pid, "encounterId": "enc-1"},
            "prefetch": prefetch}
    response = service.post("/cds-services/nudges-encounter-start", json=body)
    assert response.status_code == 200, response.text
    found = response.json()["cards"]
    # The troponin card is about this encounter, which nothing holds back: the live card is shown, fresher
    # than the waiting follow-up card (dropped), and ordered before the info card.
    assert [(c["indicator"], c["summary"][:12]) for c in found] == [("warning", "Troponin abo"),
                                                                    ("info", "Needs an int")]
    with service.runtime.store.engine.connect() as conn:
        assert conn.execute(select(cards.c.hook).where(cards.c.uuid == found[0]["uuid"])).scalar() == \
            "encounter-start"
    for card in found:
        assert_valid_card(card)


def test_a_followup_is_held_back_while_feedback_locks_out_the_chart_card(service: LiveServer,
                                                                        fhir_server: FhirServer,
                                                                        clock: FixedClock) -> None:
    pid = new_patient()
    fhir_server.resources = [patient(pid), result_for(pid)]
    assert service.post(NOTIFY, json=full_resource(fhir_server.base, result_for(pid))).json()["scheduled"] == 1
    clock.advance(minutes=10)
    earlier = {**troponin("trop-0", when="2026-03-01T20:00:00Z"), "subject": {"reference": f"Patient/{pid}"}}
    [card] = troponin_cards(service.post("/cds-services/nudges-patient-view", json=patient_view(pid, earlier)))
    accepted = {"feedback": [{"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-03-02T12:10:00Z",
                              "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}]}
    assert service.post("/cds-services/nudges-patient-view/feedback", json=accepted).status_code == 200
    clock.advance(hours=11, minutes=50)  # due at 00:00; the acceptance holds the chart card until 00:10
    [row] = followup_rows(service.runtime, pid)
    assert [o.outcome for o in service.run_due() if o.id == row.id] == ["suppressed"]


def test_followups_and_pending_cards_survive_a_restart(make_client: Callable[..., LiveServer], database_url: str,
                                                       fhir_server: FhirServer, clock: FixedClock) -> None:
    pid = new_patient()
    fhir_server.resources = [result_for(pid)]
    first = make_client(database_url=database_url, followup_poll_seconds=0)
    assert first.post(NOTIFY, json=full_resource(fhir_server.base, result_for(pid))).json()["scheduled"] == 1
    first.stop()

    clock.advance(hours=12)
    second = make_client(database_url=database_url, followup_poll_seconds=0)
    [row] = followup_rows(second.runtime, pid)
    assert [o.outcome for o in second.run_due() if o.id == row.id] == ["fired"]
    second.stop()

    third = make_client(database_url=database_url, followup_poll_seconds=0)
    assert len(troponin_cards(third.post("/cds-services/nudges-patient-view", json=quiet_view(third, pid)))) == 1
    assert troponin_cards(third.post("/cds-services/nudges-patient-view", json=quiet_view(third, pid))) == []


def test_failed_fetch_is_retried_later(service: LiveServer, fhir_server: FhirServer, clock: FixedClock) -> None:
    pid = new_patient()
    fhir_server.resources = [result_for(pid)]
    service.post(NOTIFY, json=full_resource(fhir_server.base, result_for(pid)))
    fhir_server.close()  # the EHR is down when the follow-up is due
    clock.advance(hours=12)
    [row] = followup_rows(service.runtime, pid)
    assert [o.outcome for o in service.run_due() if o.id == row.id] == ["retry"]
    [row] = followup_rows(service.runtime, pid)
    assert (row.status, row.attempts, row.patient_ref) == ("pending", 1, pid)
    assert followups.aware(row.due_at) == clock.now() + timedelta(minutes=5)


def test_background_job_runs_due_followups(make_client: Callable[..., LiveServer], fhir_server: FhirServer,
                                           clock: FixedClock) -> None:
    client = make_client(followup_poll_seconds=0.05)
    pid = new_patient()
    fhir_server.resources = [result_for(pid)]
    client.post(NOTIFY, json=full_resource(fhir_server.base, result_for(pid)))
    clock.advance(hours=12)
    deadline = time.monotonic() + 5
    while followup_rows(client.runtime, pid)[0].status != "done":
        assert time.monotonic() < deadline, "the background job did not run"
        time.sleep(0.02)
    assert len(troponin_cards(client.post("/cds-services/nudges-patient-view", json=quiet_view(client, pid)))) == 1


# -- exactly once across workers ----------------------------------------------------------------------------
def _due_rows(store: Store, clock: FixedClock, count: int) -> tuple[str, list[int]]:
    rule_id = f"race-{uuid.uuid4().hex[:8]}"  # the PostgreSQL schema is shared: only these rows are checked
    for i in range(count):
        assert schedule(store, rule_id=rule_id, patient_id=f"p{i}", start_ref=f"Observation/o{i}",
                        fhir_server=None, due_at=clock.now() - timedelta(minutes=1))
    with store.engine.connect() as conn:
        ids = sorted(r.id for r in conn.execute(select(followups.followups.c.id)
                                                 .where(followups.followups.c.rule_id == rule_id)))
    assert len(ids) == count
    return rule_id, ids


def test_two_workers_claim_each_due_row_exactly_once(database_url: str, clock: FixedClock) -> None:
    stores = [Store(database_url, clock), Store(database_url, clock)]
    try:
        stores[0].migrate()
        rule_id, mine = _due_rows(stores[0], clock, 50)
        assert all(store.ping() for store in stores)  # both connected before the race starts
        barrier = threading.Barrier(2)
        claimed: dict[str, list[int]] = {"w0": [], "w1": []}
        errors: list[BaseException] = []

        def work(name: str, store: Store) -> None:
            try:
                barrier.wait()
                while batch := claim_due(store, name, 2):
                    claimed[name] += [f.id for f in batch]
                    assert all(f.claimed_by == name and f.status == "running" for f in batch)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(name, store))
                   for name, store in zip(claimed, stores, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == []
        counts = Counter(i for ids in claimed.values() for i in ids if i in mine)
        assert sorted(counts) == mine and set(counts.values()) == {1}  # every row, exactly once
        with stores[0].engine.connect() as conn:
            rows = conn.execute(select(followups.followups).where(followups.followups.c.rule_id == rule_id)).all()
        owner = {i: name for name, ids in claimed.items() for i in ids}
        assert all(r.status == "running" and r.claimed_by == owner[r.id] and r.attempts == 1 for r in rows)
        for r in rows:
            assert complete(stores[0], followups._followup(r), owner[r.id])
            assert not complete(stores[1], followups._followup(r), owner[r.id])  # already completed
    finally:
        for store in stores:
            store.dispose()


def test_claim_skips_rows_another_worker_has_locked(pg_schema_url: str, clock: FixedClock) -> None:
    """PostgreSQL: rows a worker is claiming (locked, uncommitted) are skipped, not waited for."""
    store, other = Store(pg_schema_url, clock), Store(pg_schema_url, clock)
    try:
        store.migrate()
        _, ids = _due_rows(store, clock, 4)
        with store.engine.connect() as holder:
            holder.execute(select(followups.followups.c.id).where(followups.followups.c.id.in_(ids[:2]))
                           .with_for_update())
            got: list[list[int]] = []
            worker = threading.Thread(target=lambda: got.append([f.id for f in claim_due(other, "w2", 100)]))
            worker.start()
            worker.join(timeout=5)
            assert not worker.is_alive(), "claim_due waited on locked rows"
            assert sorted(i for i in got[0] if i in ids) == ids[2:]
            holder.rollback()
        assert sorted(f.id for f in claim_due(other, "w2", 100) if f.id in ids) == ids[:2]
    finally:
        store.dispose()
        other.dispose()


def test_pending_card_is_taken_exactly_once_by_racing_calls(database_url: str, clock: FixedClock) -> None:
    store = Store(database_url, clock)
    try:
        store.migrate()
        patient_hash = store.patient_hash(new_patient())

        def issued() -> CardRecord:
            return CardRecord(uuid=str(uuid.uuid4()), service_id=followups.FOLLOWUP_SERVICE, rule_id=RULE,
                              rule_version="1.0.0", hook=followups.FOLLOWUP_HOOK, hook_instance="followup-x",
                              patient_hash=patient_hash, bucket=Bucket(), indicator="warning", issued_at=clock.now())

        first = issued()
        assert followups.store_pending(store, first, {"uuid": first.uuid, "summary": "x"}) == "stored"
        assert followups.store_pending(store, issued(), {"summary": "again"}) == "waiting"  # one per rule
        barrier = threading.Barrier(4)
        taken: list[list[followups.PendingCard]] = []

        def take() -> None:
            barrier.wait()
            taken.append(followups.take_pending(store, patient_hash, service_id="nudges-patient-view",
                                                hook_instance=str(uuid.uuid4())))

        threads = [threading.Thread(target=take) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(len(t) for t in taken) == [0, 0, 0, 1]
        assert [p.uuid for t in taken for p in t] == [first.uuid]
    finally:
        store.dispose()


# -- the rule format ----------------------------------------------------------------------------------------
def test_followup_start_must_be_bound_by_an_all_clause(rules_dir: Path) -> None:
    path = rules_dir / "cardiology" / f"{RULE}.yaml"
    text = path.read_text()
    assert "  start: troponin\n" in text
    path.write_text(text.replace("  start: troponin\n", "  start: trop\n"))
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), start=1) if ln == "  start: trop")
    result = load_ruleset(rules_dir)
    assert result.ruleset is None
    messages = [str(p) for p in result.problems]
    expected = f"{RULE}.yaml:{line}:10: 'trop' is not bound by a clause directly under `all`"
    assert any(m.endswith(expected) for m in messages), messages


def test_followup_compiles(rules_dir: Path) -> None:
    result = load_ruleset(rules_dir)
    assert result.ruleset is not None
    rule = next(r for r in result.ruleset.rules if r.id == RULE)
    assert (rule.followup_start, rule.followup_after) == ("troponin", timedelta(hours=12))
    assert all(r.followup_start is None for r in result.ruleset.rules if r.id != RULE)


def test_every_shipped_followup_starts_from_a_record_clause() -> None:
    """A follow-up can only start from data a FHIR server notifies about (record, not drafts)."""
    shipped = load_ruleset(ROOT / "rules").ruleset
    assert shipped is not None
    starting = followups.followup_rules(shipped.rules)
    assert starting, "the catalog has time-driven rules"
    for rule in starting:
        clause = followups.start_clause(rule)
        assert clause is not None and "record" in clause.sources, rule.id


# -- the service's own access token (SMART Backend Services) ------------------------------------------------
def backend(tmp_path: Path, fhir_server: FhirServer, *, jwk: bool = False) -> dict[str, Any]:
    """An RSA key registered at the loopback server; the private half in a file for the service."""
    import json

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fhir_server.client_key = key.public_key()
    fhir_server.token = f"tok-{uuid.uuid4().hex}"
    path = tmp_path / ("backend.jwk.json" if jwk else "backend.pem")
    if jwk:
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
        path.write_text(json.dumps({"keys": [{**data, "kid": "k1", "alg": "RS384"}]}))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return {"base": fhir_server.base, "token_url": fhir_server.token_url, "client_id": fhir_server.client_id,
            "private_key_file": path, "key_id": None if jwk else "k1"}


@pytest.mark.parametrize("jwk", [False, True], ids=["pem", "jwk-set"])
def test_id_only_reads_and_followup_checks_carry_the_services_token(
        make_client: Callable[..., LiveServer], fhir_server: FhirServer, clock: FixedClock, tmp_path: Path,
        jwk: bool, caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(followup_poll_seconds=0, fhir_backend_clients=[backend(tmp_path, fhir_server, jwk=jwk)])
    pid = new_patient()
    fhir_server.resources = [patient(pid), result_for(pid)]
    body = notification("event-notification", f"{fhir_server.base}/Observation/trop-1")
    assert client.post(NOTIFY, json=body).json()["scheduled"] == 1
    assert client.post(NOTIFY, json=body).status_code == 200  # again: the cached token is reused
    assert len(fhir_server.token_requests) == 1
    request = fhir_server.token_requests[0]
    assert (request["grant_type"], request["scope"]) == ("client_credentials", "system/*.read")
    clock.advance(hours=12)
    [outcome] = [o for o in client.run_due()]
    assert outcome.outcome == "fired"
    reads = [auth for path, auth in fhir_server.requests]
    assert reads and all(auth == f"Bearer {fhir_server.token}" for auth in reads)
    assert any(path.startswith(f"/fhir/Observation?patient={pid}") for path, _ in fhir_server.requests)
    assert fhir_server.token not in caplog.text and request["client_assertion"] not in caplog.text


def test_a_refused_token_means_412_and_a_refused_read_a_new_token(
        make_client: Callable[..., LiveServer], fhir_server: FhirServer, tmp_path: Path) -> None:
    client = make_client(followup_poll_seconds=0, fhir_backend_clients=[backend(tmp_path, fhir_server)])
    pid = new_patient()
    fhir_server.resources = [result_for(pid)]
    body = notification("event-notification", f"{fhir_server.base}/Observation/trop-1")
    fhir_server.token_refusals = 1
    response = client.post(NOTIFY, json=body)
    assert response.status_code == 412 and "token endpoint answered 401" in response.text
    assert client.post(NOTIFY, json=body).status_code == 200  # the server retried; the token came
    issued = fhir_server.token
    fhir_server.token = f"tok-{uuid.uuid4().hex}"  # revoked: reads with the old one get 401
    assert client.post(NOTIFY, json=body).status_code == 412
    assert client.post(NOTIFY, json=body).status_code == 200
    assert len(fhir_server.token_requests) == 3 and issued != fhir_server.token


def test_servers_without_credentials_get_no_token(make_client: Callable[..., LiveServer], fhir_server: FhirServer,
                                                  tmp_path: Path) -> None:
    other = {**backend(tmp_path, fhir_server), "base": "https://ehr.example.org/fhir"}
    fhir_server.token = None
    client = make_client(followup_poll_seconds=0, fhir_backend_clients=[other])
    pid = new_patient()
    fhir_server.resources = [result_for(pid)]
    response = client.post(NOTIFY, json=notification("event-notification", f"{fhir_server.base}/Observation/trop-1"))
    assert response.status_code == 200
    assert fhir_server.token_requests == [] and [a for _, a in fhir_server.requests] == [None]


def test_unusable_backend_credentials_stop_the_service_at_start(tmp_path: Path, fhir_server: FhirServer) -> None:
    from nudges.errors import ConfigError
    from nudges.runtime import Runtime
    from nudges.settings import Settings

    good = backend(tmp_path, fhir_server)
    public = tmp_path / "public.pem"
    from cryptography.hazmat.primitives import serialization

    public.write_bytes(fhir_server.client_key.public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    for change, message in (({"private_key_file": tmp_path / "missing.pem"}, "cannot read"),
                            ({"private_key_file": public}, "not a usable RS384 private key"),
                            ({"key_id": None}, "set key_id"),
                            ({"token_url": "http://ehr.example.org/token"}, "must use https")):
        settings = Settings(database_url=f"sqlite:///{tmp_path}/x.db", fhir_backend_clients=[{**good, **change}])
        with pytest.raises(ConfigError, match=message):
            Runtime.create(settings)


# -- waiting cards: counted once shown, dropped when stale --------------------------------------------------
def audited(client: LiveServer) -> int:
    from nudges.tools.audit import query_cells

    with client.runtime.store.engine.connect() as conn:
        return sum(c.shown for c in query_cells(conn, None) if c.rule == RULE and c.dimension == "overall")


def test_a_waiting_card_counts_as_shown_only_once_delivered(make_client: Callable[..., LiveServer],
                                                             fhir_server: FhirServer, clock: FixedClock) -> None:
    client = make_client(followup_poll_seconds=0)
    pid = new_patient()
    fhir_server.resources = [patient(pid), result_for(pid)]
    assert client.post(NOTIFY, json=full_resource(fhir_server.base, result_for(pid))).json()["scheduled"] == 1
    clock.advance(hours=12)
    assert [o.outcome for o in client.run_due()] == ["fired"]
    assert audited(client) == 0  # waiting for the patient's next visit: nobody has seen it
    assert len(troponin_cards(client.post("/cds-services/nudges-patient-view", json=quiet_view(client, pid)))) == 1
    assert audited(client) == 1


def test_a_card_waiting_too_long_is_dropped_unshown(make_client: Callable[..., LiveServer], fhir_server: FhirServer,
                                                    clock: FixedClock) -> None:
    client = make_client(followup_poll_seconds=0, pending_card_max_age_hours=48)
    pid = new_patient()
    fhir_server.resources = [patient(pid), result_for(pid)]
    assert client.post(NOTIFY, json=full_resource(fhir_server.base, result_for(pid))).json()["scheduled"] == 1
    clock.advance(hours=12)
    assert [o.outcome for o in client.run_due()] == ["fired"]
    clock.advance(hours=48, minutes=1)  # the patient comes back after the card went stale
    assert troponin_cards(client.post("/cds-services/nudges-patient-view", json=quiet_view(client, pid))) == []
    client.run_due()  # the periodic job drops it, with its `cards` row
    with client.runtime.store.engine.connect() as conn:
        assert conn.execute(select(pending_cards)).all() == []
        assert conn.execute(select(cards).where(cards.c.rule_id == RULE)).all() == []
    assert audited(client) == 0


def test_expiry_drops_only_stale_waiting_cards(make_store: Callable[..., Store], clock: FixedClock) -> None:
    store = make_store()
    patient_hash = store.patient_hash(new_patient())

    def waiting(age: timedelta) -> str:
        record = CardRecord(uuid=str(uuid.uuid4()), service_id="followup", rule_id=f"r-{uuid.uuid4().hex[:8]}",
                            rule_version="1.0.0", hook="followup", hook_instance="followup",
                            patient_hash=patient_hash, bucket=Bucket("unknown", "unknown", "unknown", "unknown"),
                            indicator="warning", issued_at=clock.now() - age)
        assert followups.store_pending(store, record, {"summary": "x"}) == "stored"
        return record.uuid

    stale, fresh = waiting(timedelta(days=31)), waiting(timedelta(days=1))
    assert followups.expire_pending(store, timedelta(days=30)) >= 1
    with store.engine.connect() as conn:
        kept = {r.uuid for r in conn.execute(select(cards.c.uuid).where(cards.c.uuid.in_([stale, fresh])))}
        waiting_now = {r.uuid for r in conn.execute(select(pending_cards.c.uuid)
                                                    .where(pending_cards.c.uuid.in_([stale, fresh])))}
    assert kept == waiting_now == {fresh}
    shown = followups.take_pending(store, patient_hash, service_id="nudges-patient-view", hook_instance="h",
                                   max_age=timedelta(days=30))
    assert [p.uuid for p in shown] == [fresh]


def test_a_long_run_making_the_next_wait_is_not_logged_as_a_warning() -> None:
    """apscheduler warned "skipped: maximum number of running instances reached" at every interval while
    a large rule set reloaded: meant (one run at a time), and the warning read as a fault."""
    import logging

    from nudges.events.scheduler import _still_running

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("apscheduler.scheduler", logging.WARNING, __file__, 1, message, None, None)

    assert not _still_running(record('Execution of job "x" skipped: maximum number of running instances reached (1)'))
    assert _still_running(record('Run time of job "x" was missed by 0:00:03'))
