"""Alert fatigue on both real databases: suppression keyed by what a card is about, driven by feedback
(lockouts per reason, snooze, the short window of an unanswered card), latest feedback wins, restarts and
replicas, bad feedback refused. Time moves with the service's FixedClock."""

from __future__ import annotations

import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import NOW, ROOT, LiveServer
from helpers import bundle, full_prefetch, patient, patient_view, troponin
from sqlalchemy import select

from nudges.cli import main
from nudges.clock import FixedClock, parse_instant
from nudges.rules.valuesets import NON_ADHERENCE_SYSTEM, REMIND_LATER
from nudges.settings import Settings
from nudges.store import Bucket, CardRecord, Store, cards, feedback
from nudges.suppression import appointment_identity, order_identity

INTERPRETER = "Needs an interpreter"
EGFR = "eGFR with a race"
TROPONIN = "Troponin above"
RULE_FILE = Path("language/professional-interpreter.yaml")
LIST_FORM = "  override_reasons: [indication-order-exists, service-not-available, patient-refuses]\n"
MAPPING_FORM = ("  override_reasons:\n    indication-order-exists: 2d\n    service-not-available: 6h\n"
                "    patient-refuses: 30d\n")


def copy_rules(root: Path) -> Path:
    target = root / "project" / "rules"
    shutil.copytree(ROOT / "tests" / "rules", target)
    for folder in ("seeds", "fhir_fixtures"):
        shutil.copytree(ROOT / folder, root / "project" / folder)
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One service per database for the module, serving the test rules with the interpreter rule's reasons
    in the mapping form (reason -> lockout) and a 2 h snooze."""
    root = tmp_path_factory.mktemp("suppression")
    rules = copy_rules(root)
    edit(rules / RULE_FILE, LIST_FORM, MAPPING_FORM)
    url = f"sqlite:///{root}/nudges.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    live = LiveServer(Settings(rules=rules, database_url=url, reload_interval_seconds=0, followup_poll_seconds=0,
                               suppression={"snooze": "2h"}), FixedClock(parse_instant(NOW)))
    yield live
    live.stop()


@pytest.fixture
def svc(server: LiveServer) -> LiveServer:
    """The module's service with its clock back at NOW (each test uses patients of its own)."""
    server.runtime.clock.instant = parse_instant(NOW)
    return server


def later(server: LiveServer, **delta: float) -> None:
    server.runtime.clock.advance(**delta)


def new_pid() -> str:
    return f"pt-{uuid.uuid4().hex[:12]}"


def speaks_vietnamese(pid: str) -> dict[str, Any]:
    return patient(pid, communication=[{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "vi"}]},
                                        "preferred": True}])


def post(server: LiveServer, hook: str, context: dict[str, Any], prefetch: dict[str, Any]) -> list[dict[str, Any]]:
    body = {"hook": hook, "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/dr-1", **context}, "prefetch": prefetch}
    response = server.post(f"/cds-services/nudges-{hook}", json=body)
    assert response.status_code == 200, response.text
    cards: list[dict[str, Any]] = response.json()["cards"]
    return cards


def one(cards: list[dict[str, Any]], summary: str) -> dict[str, Any] | None:
    found = [c for c in cards if c["summary"].startswith(summary)]
    assert len(found) <= 1
    return found[0] if found else None


def encounter_start(server: LiveServer, pid: str, encounter: str = "enc-1", *resources: dict[str, Any],
                    who: dict[str, Any] | None = None) -> dict[str, Any] | None:
    prefetch = full_prefetch("encounter-start", who or speaks_vietnamese(pid), *resources)
    return one(post(server, "encounter-start", {"patientId": pid, "encounterId": encounter}, prefetch),
               INTERPRETER if who is None else TROPONIN)


def appointment(aid: str | None, pid: str, start: str = "2026-03-20T09:00:00Z") -> dict[str, Any]:
    resource = {"resourceType": "Appointment", "status": "proposed", "start": start,
                "participant": [{"actor": {"reference": f"Patient/{pid}"}, "status": "needs-action"}]}
    return {**resource, "id": aid} if aid else resource


def appointment_book(server: LiveServer, pid: str, *appointments: dict[str, Any]) -> dict[str, Any] | None:
    return one(post(server, "appointment-book", {"patientId": pid, "appointments": bundle(*appointments)},
                    full_prefetch("appointment-book", speaks_vietnamese(pid))), INTERPRETER)


def order(oid: str, pid: str, code: str) -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "id": oid, "status": "draft", "intent": "order",
            "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]}}


def order_select(server: LiveServer, pid: str, chosen: dict[str, Any],
                 *drafts: dict[str, Any]) -> dict[str, Any] | None:
    context = {"patientId": pid, "selections": [f"ServiceRequest/{chosen['id']}"],
               "draftOrders": bundle(*(drafts or (chosen,)))}
    return one(post(server, "order-select", context, full_prefetch("order-select", patient(pid))), EGFR)


def order_sign(server: LiveServer, pid: str, *drafts: dict[str, Any]) -> dict[str, Any] | None:
    context = {"patientId": pid, "draftOrders": bundle(*drafts)}
    return one(post(server, "order-sign", context, full_prefetch("order-sign", patient(pid))), EGFR)


def chart(server: LiveServer, pid: str, *resources: dict[str, Any]) -> dict[str, Any] | None:
    response = server.post("/cds-services/nudges-patient-view", json=patient_view(pid, *resources))
    assert response.status_code == 200, response.text
    return one(response.json()["cards"], TROPONIN)


def recent_troponin(server: LiveServer) -> dict[str, Any]:
    """Elevated 14 h before the service's now (the rule wants 12 h to 72 h)."""
    when = server.runtime.clock.now() - timedelta(hours=14)
    return troponin(when=when.strftime("%Y-%m-%dT%H:%M:%SZ"))


def reason(code: str, system: str = NON_ADHERENCE_SYSTEM) -> dict[str, str]:
    return {"system": system, "code": code}


def send(server: LiveServer, hook: str, card: dict[str, Any] | None, outcome: str, *, at: timedelta = timedelta(),
         why: dict[str, str] | None = None, status: int = 200) -> dict[str, Any]:
    assert card is not None
    entry: dict[str, Any] = {"card": card["uuid"], "outcome": outcome,
                             "outcomeTimestamp": (server.runtime.clock.now() + at).isoformat()}
    if outcome == "accepted":
        entry["acceptedSuggestions"] = [{"id": card["suggestions"][0]["uuid"]}]
    elif why is not None:
        entry["overrideReason"] = {"reason": why}
    response = server.post(f"/cds-services/nudges-{hook}/feedback", json={"feedback": [entry]})
    assert response.status_code == status, response.text
    answer: dict[str, Any] = response.json()
    return answer


# -- keyed by what the card is about -------------------------------------------------------------------
def test_interpreter_card_at_encounter_start_and_again_at_appointment_book(svc: LiveServer) -> None:
    pid = new_pid()
    assert encounter_start(svc, pid, "enc-1") is not None
    assert encounter_start(svc, pid, "enc-1") is None  # a chart refresh in the same encounter
    card = appointment_book(svc, pid, appointment("apt-1", pid))  # booking is when an interpreter is requested
    assert card is not None and "interpreter" in card["summary"]
    assert appointment_book(svc, pid, appointment("apt-1", pid)) is None
    assert appointment_book(svc, pid, appointment("apt-2", pid)) is not None  # another appointment
    # an appointment without an id is known by its type and start
    assert appointment_book(svc, pid, appointment(None, pid)) is not None
    assert appointment_book(svc, pid, appointment(None, pid)) is None
    assert appointment_book(svc, pid, appointment(None, pid, "2026-03-27T09:00:00Z")) is not None
    assert encounter_start(svc, pid, "enc-2") is not None  # the next encounter


def test_each_draft_order_gets_its_card_and_sign_does_not_repeat_select(svc: LiveServer) -> None:
    pid = new_pid()
    a, b = order("d1", pid, "88293-6"), order("d2", pid, "48643-1")
    assert order_select(svc, pid, a) is not None
    assert order_sign(svc, pid, a) is None  # the same order: the select card is not repeated
    assert order_sign(svc, pid, {**a, "id": "d1-signed"}) is None  # the EHR minted a new id: the same order
    assert order_select(svc, pid, b, a, b) is not None  # a second, different order gets its own card
    assert order_sign(svc, pid, a, b) is None
    later(svc, minutes=5)  # nobody answered: the short window is over
    assert order_sign(svc, pid, a) is not None


def test_an_unanswered_card_reappears_after_the_short_window(svc: LiveServer) -> None:
    pid = new_pid()
    data = recent_troponin(svc)
    assert chart(svc, pid, data) is not None
    later(svc, minutes=4, seconds=59)
    assert chart(svc, pid, data) is None
    later(svc, seconds=1)
    assert chart(svc, pid, data) is not None  # not 12 h (the rule's suppress): nobody acted on it


# -- feedback drives it ----------------------------------------------------------------------------------
def test_an_override_locks_out_for_that_reasons_window_and_no_longer(svc: LiveServer) -> None:
    pid = new_pid()
    card = encounter_start(svc, pid)
    later(svc, minutes=3)
    assert send(svc, "encounter-start", card, "overridden", at=-timedelta(minutes=2),
                why=reason("service-not-available")) == {"stored": 1, "duplicates": 0}
    later(svc, hours=5, minutes=57)  # the lockout runs from the outcome's time: 6 h after 12:01
    assert encounter_start(svc, pid) is None
    later(svc, minutes=1)
    card = encounter_start(svc, pid)
    assert card is not None
    send(svc, "encounter-start", card, "overridden", why=reason("patient-refuses"))  # 30d
    later(svc, days=29, hours=23)
    assert encounter_start(svc, pid) is None
    later(svc, hours=1)
    assert encounter_start(svc, pid) is not None


def test_a_listed_reason_locks_out_for_the_rules_suppress_window(svc: LiveServer) -> None:
    pid = new_pid()
    data = recent_troponin(svc)
    card = chart(svc, pid, data)
    send(svc, "patient-view", card, "overridden", why=reason("indication-order-exists"))  # list form: suppress 12h
    later(svc, hours=11, minutes=59)
    assert chart(svc, pid, data) is None
    later(svc, minutes=1)
    assert chart(svc, pid, data) is not None


def test_accept_stops_repeats_for_that_focus(svc: LiveServer) -> None:
    pid = new_pid()
    data = recent_troponin(svc)
    card = chart(svc, pid, data)
    later(svc, minutes=1)
    send(svc, "patient-view", card, "accepted")
    later(svc, hours=11)
    assert chart(svc, pid, data) is None
    assert encounter_start(svc, pid, "enc-7", data, who=patient(pid)) is not None  # another focus: the encounter
    later(svc, hours=1)  # the rule's suppress (12 h) after the acceptance
    assert chart(svc, pid, data) is not None


def test_remind_me_later_is_offered_on_every_card_with_reasons_and_snoozes(svc: LiveServer) -> None:
    pid = new_pid()
    card = encounter_start(svc, pid)
    assert card is not None
    assert card["overrideReasons"][-1] == REMIND_LATER
    assert [r["code"] for r in card["overrideReasons"][:-1]] == [
        "indication-order-exists", "service-not-available", "patient-refuses"]
    send(svc, "encounter-start", card, "overridden", why=dict(REMIND_LATER))
    later(svc, hours=1, minutes=59)
    assert encounter_start(svc, pid) is None
    later(svc, minutes=1)  # suppression.snooze: 2h in this service's settings
    assert encounter_start(svc, pid) is not None


def test_the_latest_outcome_wins_whatever_order_feedback_arrives_in(svc: LiveServer) -> None:
    pids = new_pid(), new_pid()
    shown = [encounter_start(svc, pid) for pid in pids]
    later(svc, minutes=3)
    accepted = {"at": -timedelta(minutes=1)}  # 12:02
    refused = {"at": -timedelta(minutes=2), "why": reason("patient-refuses")}  # 30 d, but at 12:01
    for i, card in enumerate(shown):
        if i == 0:
            send(svc, "encounter-start", card, "accepted", **accepted)
            assert send(svc, "encounter-start", card, "overridden", **refused)["stored"] == 1  # late, older
        else:
            send(svc, "encounter-start", card, "overridden", **refused)
            send(svc, "encounter-start", card, "accepted", **accepted)
        assert send(svc, "encounter-start", card, "accepted", **accepted) == {"stored": 0, "duplicates": 1}
    later(svc, days=1, minutes=-2)  # accepted at 12:02 holds for the rule's suppress, 1 d
    assert [encounter_start(svc, pid) for pid in pids] == [None, None]
    later(svc, minutes=1)
    assert all(encounter_start(svc, pid) is not None for pid in pids)


def test_a_call_sent_again_gets_its_cards_again_and_stores_them_once(svc: LiveServer) -> None:
    """The same hookInstance is the same call (an EHR that timed out before reading the answer, then
    retried): it had been answered with no cards, its first answer's cards counted as shown. Now it gets
    the same cards (same uuids), stored once; another call meanwhile is held back as before, and a card
    with feedback since is not shown again."""
    pid = new_pid()
    body = patient_view(pid, recent_troponin(svc))
    first = svc.post("/cds-services/nudges-patient-view", json=body).json()["cards"]
    assert one(first, TROPONIN) is not None
    later(svc, minutes=1)
    again = svc.post("/cds-services/nudges-patient-view", json=body).json()["cards"]
    assert [(c["uuid"], c["summary"]) for c in again] == [(c["uuid"], c["summary"]) for c in first]
    with svc.runtime.store.engine.connect() as conn:
        stored = conn.execute(select(cards.c.uuid).where(cards.c.hook_instance == body["hookInstance"])).scalars()
        assert sorted(stored) == sorted(c["uuid"] for c in first)
    assert chart(svc, pid, recent_troponin(svc)) is None  # another call: the display window holds
    metric = r'nudges_cards_suppressed_total\{rule="troponin-without-cath-plan"\} (\d+)'
    held = re.search(metric, svc.get("/metrics").text)
    assert held and int(held.group(1)) >= 1
    troponin_card = one(first, TROPONIN)
    send(svc, "patient-view", troponin_card, "overridden", why=reason("patient-ineligible"))
    after_feedback = svc.post("/cds-services/nudges-patient-view", json=body).json()["cards"]
    assert [c["uuid"] for c in after_feedback] == [c["uuid"] for c in first if c is not troponin_card]


def test_an_outcome_stamped_ahead_of_time_does_not_stay_the_latest(svc: LiveServer) -> None:
    """An EHR clock three days fast: its "remind me later" counts from its arrival, and the next outcome,
    stamped correctly, is later than it (it had stayed "the latest" for three days, so a 30-day refusal
    was ignored and the card came back after the 2 h snooze)."""
    pid = new_pid()
    card = encounter_start(svc, pid)
    send(svc, "encounter-start", card, "overridden", why=dict(REMIND_LATER), at=timedelta(days=3))
    later(svc, minutes=1)
    send(svc, "encounter-start", card, "overridden", why=reason("patient-refuses"))  # 30 d from now
    later(svc, hours=3)
    assert encounter_start(svc, pid) is None
    later(svc, days=30)
    assert encounter_start(svc, pid) is not None


def test_bad_feedback_is_refused_and_nothing_is_stored(svc: LiveServer) -> None:
    pid = new_pid()
    card = encounter_start(svc, pid)
    assert card is not None
    for why in (reason("risk-benefit-ratio"),  # an HL7 code this rule does not offer
                reason("patient-refuses", "http://example.org/other-system"),
                reason("no-such-code")):
        answer = send(svc, "encounter-start", card, "overridden", why=why, status=400)
        assert answer["resourceType"] == "OperationOutcome"
        assert "does not offer" in answer["issue"][0]["diagnostics"] and "patient-refuses" in \
            answer["issue"][0]["diagnostics"]
    good = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": NOW,
            "overrideReason": {"reason": reason("patient-refuses")}}
    bad = {**good, "overrideReason": {"reason": reason("too-costly-uncovered")}}
    response = svc.post("/cds-services/nudges-encounter-start/feedback", json={"feedback": [good, bad]})
    assert response.status_code == 400
    with svc.runtime.store.engine.connect() as conn:
        assert conn.execute(select(feedback).where(feedback.c.card_uuid == card["uuid"])).all() == []
    later(svc, minutes=5)
    assert encounter_start(svc, pid) is not None  # no lockout was set either
    # a reason named by its code alone is the card's own when that is unambiguous
    card = encounter_start(svc, new_pid())
    assert send(svc, "encounter-start", card, "overridden", why={"code": "patient-refuses"})["stored"] == 1


def feedback_counts(server: LiveServer) -> dict[tuple[str, str, str], float]:
    found = re.findall(r'^nudges_feedback_total\{outcome="([^"]+)",reason="([^"]+)",rule="([^"]+)"\} (\S+)$',
                       server.get("/metrics").text, re.MULTILINE)
    return {(rule, outcome, why): float(value) for outcome, why, rule, value in found}


def test_feedback_is_counted_by_rule_outcome_and_offered_reason(svc: LiveServer) -> None:
    before = feedback_counts(svc)
    card = encounter_start(svc, new_pid())
    send(svc, "encounter-start", card, "overridden", why=dict(REMIND_LATER))
    send(svc, "encounter-start", card, "overridden", why=dict(REMIND_LATER))  # a duplicate is not counted
    counts = feedback_counts(svc)
    key = ("professional-interpreter", "overridden", "remind-me-later")
    assert counts[key] == before.get(key, 0.0) + 1
    offered = {"indication-order-exists", "service-not-available", "patient-refuses", "remind-me-later",
               "patient-ineligible", "risk-benefit-ratio", "prefers-alternative", "none", "other"}
    assert {why for _, _, why in counts} <= offered  # bounded: the rules' own codes, none or other


# -- stored in the database: restarts and replicas ------------------------------------------------------------
def test_suppression_survives_a_restart_and_is_shared_by_replicas(make_client: Callable[..., LiveServer],
                                                                  database_url: str, rules_dir: Path,
                                                                  clock: FixedClock) -> None:
    edit(rules_dir / RULE_FILE, LIST_FORM, MAPPING_FORM)
    one_, two = make_client(database_url=database_url), make_client(database_url=database_url)
    pid = new_pid()
    card = encounter_start(one_, pid)
    assert card is not None and encounter_start(two, pid) is None  # the other replica knows it was shown
    send(two, "encounter-start", card, "overridden", why=reason("patient-refuses"))
    one_.stop()
    two.stop()
    clock.advance(minutes=10)
    third = make_client(database_url=database_url)
    assert encounter_start(third, pid) is None
    clock.advance(days=30)
    assert encounter_start(third, pid) is not None


def race(store: Store, patient_hash: str, barrier: threading.Barrier, won: list[CardRecord],
         clock: FixedClock) -> None:
    record = CardRecord(uuid=str(uuid.uuid4()), service_id="nudges-patient-view", rule_id="rule-r",
                        rule_version="1.0.0", hook="patient-view", hook_instance="h", patient_hash=patient_hash,
                        bucket=Bucket(), indicator="info", issued_at=clock.now(), focus="f")
    barrier.wait(timeout=30)
    won.extend(store.show_cards([record], timedelta(minutes=5)))


def test_two_replicas_deciding_at_once_show_one_card(database_url: str, clock: FixedClock) -> None:
    """The decision is one statement per focus: however the two race, exactly one card is shown."""
    replicas = [Store(database_url, clock), Store(database_url, clock)]
    replicas[0].migrate()
    try:
        key = replicas[0].hash_key()
        replicas[1]._hash_key = key
        for _ in range(12):
            patient_hash = replicas[0].patient_hash(new_pid())
            barrier, won = threading.Barrier(2), []
            threads = [threading.Thread(target=race, args=(s, patient_hash, barrier, won, clock)) for s in replicas]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert len(won) == 1
    finally:
        for store in replicas:
            store.dispose()


# -- rule files: the mapping form and its errors --------------------------------------------------------------
def test_lockouts_in_rule_files_are_checked_with_positions(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rules_dir / RULE_FILE
    edit(path, LIST_FORM, "  override_reasons:\n    patient-refuses: 30 days\n    limited-time: 7d\n")
    line = path.read_text().splitlines().index("    patient-refuses: 30 days") + 1
    assert main(["lint", str(rules_dir)]) == 1
    out = capsys.readouterr().out
    assert f"professional-interpreter.yaml:{line}:5: card.override_reasons.patient-refuses: " in out
    assert "'30 days' is not a duration" in out

    edit(path, "    patient-refuses: 30 days\n", "    patient-refuse: 30d\n")
    assert main(["lint", str(rules_dir)]) == 1
    out = capsys.readouterr().out
    assert f"professional-interpreter.yaml:{line}:5: 'patient-refuse' is not an HL7 non-adherence" in out
    assert "did you mean 'patient-refuses'" in out

    edit(path, "    patient-refuse: 30d\n    limited-time: 7d\n",
         "    - patient-refuses\n    - {system: 'http://example.org/reasons', code: on-hold, display: On hold, "
         "lockout: soon}\n")
    assert main(["lint", str(rules_dir)]) == 1
    out = capsys.readouterr().out
    column = path.read_text().splitlines()[line].index("lockout") + 1
    assert f"professional-interpreter.yaml:{line + 1}:{column}: card.override_reasons.1.lockout: Value error, " \
           "'soon' is not a duration" in out
    assert len([ln for ln in out.splitlines() if "override_reasons" in ln]) == 1  # not once per union member

    edit(path, "lockout: soon}", "lockout: 3d}\n    - {system: 'urn:nudges:override-reason', code: remind-me-later, "
         "display: Later}")
    assert main(["lint", str(rules_dir)]) == 1
    assert f"professional-interpreter.yaml:{line + 2}:7: 'remind-me-later' is the service's own snooze" in \
        capsys.readouterr().out


def test_a_listed_coding_may_carry_its_own_lockout(rules_dir: Path) -> None:
    from nudges.rules.compiler import load_ruleset
    from nudges.settings import SuppressionSettings
    from nudges.store import FeedbackRecord
    from nudges.suppression import Policy

    edit(rules_dir / RULE_FILE, LIST_FORM, "  override_reasons:\n    - patient-refuses\n"
         "    - {system: 'http://example.org/reasons', code: on-hold, display: On hold, lockout: 3d}\n")
    ruleset = load_ruleset(rules_dir).ruleset
    assert ruleset is not None
    rule = next(r for r in ruleset.rules if r.id == "professional-interpreter")
    policy = Policy(SuppressionSettings(overridden="5d"))

    def lockout(code: str | None, system: str | None = None, outcome: str = "overridden") -> timedelta:
        return policy.lockout(rule, FeedbackRecord("c", "s", outcome, parse_instant(NOW), override_code=code,
                                                   override_system=system))

    assert lockout("on-hold", "http://example.org/reasons") == timedelta(days=3)
    assert lockout("patient-refuses", NON_ADHERENCE_SYSTEM) == timedelta(days=1)  # the rule's suppress
    assert lockout(None) == timedelta(days=1) and lockout(None, outcome="accepted") == timedelta(days=1)
    assert policy.lockout(None, FeedbackRecord("c", "s", "overridden", parse_instant(NOW))) == timedelta(days=5)


def test_order_and_appointment_identities() -> None:
    coded = {"resourceType": "MedicationRequest", "id": "m1",
             "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                       "code": "197361"}]}}
    by_reference = {"resourceType": "MedicationRequest", "id": "m2", "medicationReference": {"reference": "#med"},
                    "contained": [{"resourceType": "Medication", "id": "med", "code": coded[
                        "medicationCodeableConcept"]}]}
    elsewhere = {"resourceType": "MedicationRequest", "id": "m3", "medicationReference": {"reference": "Medication/x"}}
    medications = {"x": {"resourceType": "Medication", "id": "x", "code": coded["medicationCodeableConcept"]}}
    assert order_identity(coded) == order_identity(by_reference) == order_identity(elsewhere, medications)
    assert order_identity(coded) != order_identity({**coded, "resourceType": "MedicationDispense"})
    worded = {"resourceType": "ServiceRequest", "id": "s1", "code": {"text": "Security  Room Search"}}
    assert order_identity(worded) == order_identity({**worded, "id": "s2", "code": {"text": "security room search"}})
    assert order_identity(worded) != order_identity({**worded, "code": {"text": "restraint"}})
    assert appointment_identity({"resourceType": "Appointment", "id": "a1"}) == "Appointment/a1"
    proposal = {"resourceType": "Appointment", "start": "2026-03-20T09:00:00Z",
                "appointmentType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0276",
                                                "code": "FOLLOWUP"}]}}
    assert appointment_identity(proposal) != appointment_identity({**proposal, "start": "2026-03-21T09:00:00Z"})
    assert appointment_identity(proposal) != appointment_identity({**proposal, "appointmentType": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0276", "code": "ROUTINE"}]}})
    assert appointment_identity(proposal) == appointment_identity({**proposal, "reasonCode": [{"text": "knee"}]})


def test_an_escalated_card_comes_back_through_an_accept_but_not_through_an_override(
        make_client: Callable[..., LiveServer], rules_dir: Path, database_url: str) -> None:
    """A troponin warning that has become critical (`escalate:`) is shown again, even though the first card
    was accepted (acted on, and still no plan); a clinician's override with a reason stands."""
    edit(rules_dir / "cardiology" / "troponin-without-cath-plan.yaml", "  indicator: warning\n",
         "  indicator: warning\n  escalate:\n    - {after: 13h, since: troponin, indicator: critical}\n")
    server = make_client(database_url=database_url, followup_poll_seconds=0)
    when = (server.runtime.clock.now() - timedelta(hours=12, minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for outcome, again in (("accepted", True), ("overridden", False)):
        pid = new_pid()
        data = troponin(when=when)
        first = chart(server, pid, data)
        assert first is not None and first["indicator"] == "warning"
        send(server, "patient-view", first, outcome,
             why=reason("risk-benefit-ratio") if outcome == "overridden" else None)
        later(server, minutes=10)
        assert chart(server, pid, data) is None  # still a warning: held back
        later(server, minutes=30)  # 13 h 10 min after the result: critical now
        escalated = chart(server, pid, data)
        assert (escalated is not None) is again, outcome
        if escalated is not None:
            assert escalated["indicator"] == "critical"
            later(server, minutes=10)
            assert chart(server, pid, data) is None  # shown once at its new level
        server.runtime.clock.instant = parse_instant(NOW)
