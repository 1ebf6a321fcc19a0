"""Push delivery through the real app, real databases and real loopback receivers: the rule format
(`followup.deliver`), the outbox (claims, retries, back-off, dead rows seen in /metrics, /readyz and the
CLI), FHIR writes (conditional create; Communication and Task), and webhooks (CloudEvents signed as
Standard Webhooks, checked by a receiver that verifies them). The real FHIR server is in test_loop.py."""

from __future__ import annotations

import base64
import email.utils
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import FhirServer, LiveServer
from fhir.resources.R4B.task import Task
from helpers import TROPONIN_RULE, add_followup, patient, patient_view, troponin
from sqlalchemy import select

from nudges.cli import main
from nudges.clock import FixedClock
from nudges.errors import ConfigError
from nudges.events import followups, outbox, webhooks
from nudges.fhirserver.client import retry_after
from nudges.rules.compiler import load_ruleset
from nudges.rules.delivery import Targets
from nudges.settings import Settings
from nudges.store import Store

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
POOL = {"reference": "PractitionerRole/oncall-cardiology", "display": "On-call cardiology"}


class Receiver:
    """A webhook receiver on loopback that verifies every request as Standard Webhooks says, records it,
    and answers what `statuses` scripts (then 204), after `delay` seconds, with `retry_after` if set."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes, bool]] = []
        self.statuses: list[int] = []
        self.delay = 0.0
        self.retry_after: str | None = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = dict(self.headers.items())
                receiver.received.append((headers, body, webhooks.verify(SECRET, headers, body)))
                if receiver.delay:
                    threading.Event().wait(receiver.delay)
                try:
                    self.send_response(receiver.statuses.pop(0) if receiver.statuses else 204)
                    self.send_header("Content-Length", "0")
                    if receiver.retry_after is not None:
                        self.send_header("Retry-After", receiver.retry_after)
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/nudges"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


def new_patient() -> str:
    return f"pt-{uuid.uuid4().hex[:12]}"


def encounter(eid: str, pid: str, *participants: tuple[str, str]) -> dict[str, Any]:
    return {"resourceType": "Encounter", "id": eid, "status": "in-progress", "subject": {"reference": f"Patient/{pid}"},
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
            "participant": [{"type": [{"coding": [{"code": code}]}], "individual": {"reference": who}}
                            for code, who in participants]}


def fire(service: LiveServer, fhir_server: FhirServer, clock: FixedClock, pid: str,
         with_encounter: str | None = None) -> str:
    """A troponin notified (full resource), twelve hours with nothing ordered, the follow-up run: the card
    fires and its deliveries are queued. Returns the card uuid."""
    result = {**troponin("trop-1", when=(clock.now() - timedelta(hours=1)).isoformat()),
              "subject": {"reference": f"Patient/{pid}"}}
    if with_encounter:
        result["encounter"] = {"reference": f"Encounter/{with_encounter}"}
    fhir_server.resources += [patient(pid), result]
    url = f"{fhir_server.base}/Observation/trop-1"
    note = {"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {"resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": f"{fhir_server.base}/Subscription/s"}},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "notification-event", "part": [{"name": "focus", "valueReference": {"reference": url}}]}]}},
        {"fullUrl": url, "resource": result}]}
    assert service.post("/fhir/notifications", json=note).json()["scheduled"] == 1
    store = service.runtime.store
    with store.engine.connect() as conn:  # the PostgreSQL schema is shared by the session: only ours counts
        mine = conn.execute(select(followups.followups.c.id).where(
            followups.followups.c.patient_hash == store.patient_hash(pid))).scalar_one()
    clock.advance(hours=12)
    assert [o.outcome for o in service.run_due() if o.id == mine] == ["fired"]
    with service.runtime.store.engine.connect() as conn:
        return str(conn.execute(select(followups.pending_cards.c.uuid).where(
            followups.pending_cards.c.patient_hash == service.runtime.store.patient_hash(pid))).scalar_one())


def delivery(service: LiveServer, card: str) -> Any:
    with service.runtime.store.engine.connect() as conn:
        return conn.execute(select(outbox.deliveries).where(outbox.deliveries.c.card_uuid == card)).one()


def waiting(service: LiveServer, pid: str, card: str) -> bool:
    """Is the card still shown at the patient's next hook call?"""
    answer = service.post("/cds-services/nudges-patient-view", json=patient_view(pid))
    assert answer.status_code == 200, answer.text
    return card in [c["uuid"] for c in answer.json()["cards"]]


def settings(receiver: Receiver | None = None, **delivery: Any) -> dict[str, Any]:
    hooks = {"paging": {"url": receiver.url, "secret": SECRET, "timeout_seconds": 1}} if receiver else {}
    return {"followup_poll_seconds": 0, "delivery": {"poll_seconds": 0, "pools": {"cardiology-on-call": POOL},
                                                      "webhooks": hooks, **delivery}}


# -- the rule format -------------------------------------------------------------------------------------
def test_deliver_problems_are_reported_at_their_line(rules_dir: Path) -> None:
    path = add_followup(rules_dir, """- {channel: communication, to: pool}
- {channel: communication, to: care-team, pool: cardiolgy-on-call}
- {channel: task, owner: pool, pool: cardiology-on-call, roles: [ATND]}
- {channel: webhook, endpoint: pager}
- {channel: sms, to: pool}""")
    lines = path.read_text().splitlines()

    def at(fragment: str) -> int:
        return next(i for i, text in enumerate(lines, start=1) if fragment in text)

    result = load_ruleset(rules_dir, targets=Targets(frozenset({"cardiology-on-call"}), frozenset({"paging"})))
    assert result.ruleset is None
    messages = sorted(str(p).split(f"{TROPONIN_RULE}.yaml:", 1)[1] for p in result.problems)
    assert any(m.startswith(f"{at('channel: sms')}:") and "'sms'" in m and "'communication', 'task', 'webhook'"
               in m for m in messages), messages
    path.write_text(path.read_text().replace("    - {channel: sms, to: pool}\n", ""))
    result = load_ruleset(rules_dir, targets=Targets(frozenset({"cardiology-on-call"}), frozenset({"paging"})))
    messages = sorted(str(p).split(f"{TROPONIN_RULE}.yaml:", 1)[1] for p in result.problems)
    assert messages == sorted([
        f"{at('to: pool}')}:36: to: pool needs `pool:` naming a pool configured in delivery.pools",
        f"{at('cardiolgy')}:53: pool 'cardiolgy-on-call' is not configured (did you mean 'cardiology-on-call'?): "
        "add it to delivery.pools (configured: cardiology-on-call)",
        f"{at('cardiolgy')}:17: channel 'communication' is listed twice: one Communication per card goes to every "
        "recipient, so give it once (first at deliver[0])",
        f"{at('roles: [ATND]')}:69: `roles` narrows encounter-participants or care-team; a pool is addressed whole",
        f"{at('pager')}:36: webhook endpoint 'pager' is not configured: add it to delivery.webhooks "
        "(configured: paging)"]), messages
    # Without a site's settings the names cannot be checked; everything else still is.
    unchecked = sorted(str(p).split(".yaml:", 1)[1] for p in load_ruleset(rules_dir).problems)
    assert len(unchecked) == 3 and not any("not configured" in m for m in unchecked)


def test_lint_with_the_service_settings_checks_the_names(rules_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    add_followup(rules_dir, "- {channel: communication, to: pool, pool: cardiology-on-call}")
    assert main(["lint", str(rules_dir)]) == 0
    config = tmp_path / "config.yaml"
    config.write_text("delivery:\n  pools:\n    emergency-team: {reference: Group/ed-team}\n")
    capsys.readouterr()
    assert main(["lint", str(rules_dir), "--config", str(config)]) == 1
    assert "pool 'cardiology-on-call' is not configured" in capsys.readouterr().out


def test_a_site_without_the_pool_still_serves_and_the_push_goes_dead(
        make_client: Callable[..., LiveServer], rules_dir: Path, fhir_server: FhirServer, clock: FixedClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """A shared catalog names pools every site sets up in its own time: the service loads the rules,
    warns at start, and a push needing the missing pool is dead (counted) while its card keeps waiting."""
    add_followup(rules_dir, "- {channel: communication, to: pool, pool: cardiology-on-call}")
    service = make_client(followup_poll_seconds=0, delivery={"poll_seconds": 0})
    assert "those pushes will go dead" in caplog.text and "pool 'cardiology-on-call' is not configured" in str(
        [r.__dict__.get("warnings") for r in caplog.records])
    pid = new_patient()
    card = fire(service, fhir_server, clock, pid)
    assert [o.outcome for o in service.send_outbox()] == ["dead"]
    assert "pool 'cardiology-on-call' is not configured" in delivery(service, card).last_error
    assert waiting(service, pid, card)


def test_deliver_compiles(rules_dir: Path) -> None:
    add_followup(rules_dir, """- {channel: communication, to: encounter-participants, roles: [ATND],
   pool: cardiology-on-call}
- {channel: task, owner: pool, pool: cardiology-on-call, due: 30min}
- {channel: webhook, endpoint: paging}""")
    result = load_ruleset(rules_dir, targets=Targets(frozenset({"cardiology-on-call"}), frozenset({"paging"})))
    assert result.ruleset is not None, result.problems
    rule = next(r for r in result.ruleset.rules if r.id == TROPONIN_RULE)
    assert [d.spec() for d in rule.deliver] == [
        {"channel": "communication", "recipients": "encounter-participants", "pool": "cardiology-on-call",
         "roles": ["ATND"]},
        {"channel": "task", "recipients": "pool", "pool": "cardiology-on-call", "due_seconds": 1800},
        {"channel": "webhook", "endpoint": "paging"}]


def test_settings_that_would_fail_at_send_time_stop_the_service(tmp_path: Path, rules_dir: Path) -> None:
    from nudges.runtime import Runtime

    base = {"database_url": f"sqlite:///{tmp_path}/x.db", "rules": rules_dir}
    for delivery_settings, message in (
            ({"webhooks": {"p": {"url": "http://pager.example.org/x", "secret": SECRET}}}, "must use https"),
            ({"webhooks": {"p": {"url": "https://pager.example.org/x", "secret": "s3cret"}}}, "starts with whsec_"),
            ({"webhooks": {"p": {"url": "https://pager.example.org/x", "secret": "whsec_c2hvcnQ="}}}, "24 to 64"),
            ({"fhir_server": "http://ehr.example.org/fhir"}, "delivery.fhir_server")):
        with pytest.raises(ConfigError, match=message):
            Runtime.create(Settings(**base, delivery=delivery_settings))


# -- webhooks --------------------------------------------------------------------------------------------
def test_standard_webhooks_signature_matches_the_reference_vector() -> None:
    secret, message_id, stamp = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
    body = b'{"test": 2432232314}'
    signed = webhooks.sign(secret, message_id, stamp, body)
    assert signed == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": message_id, "webhook-timestamp": str(stamp), "webhook-signature": signed}
    assert webhooks.verify(secret, headers, body, now=stamp + 299)
    assert webhooks.verify(secret, {**headers, "webhook-signature": f"v1,bm9wZQ== {signed}"}, body, now=stamp)
    assert not webhooks.verify(secret, headers, body + b" ", now=stamp)  # tampered
    assert not webhooks.verify(secret, headers, body, now=stamp + 301)  # stale
    assert not webhooks.verify(SECRET, headers, body, now=stamp)  # another secret


def test_webhook_is_a_signed_cloudevent_sent_once(make_client: Callable[..., LiveServer], rules_dir: Path,
                                                   fhir_server: FhirServer, receiver: Receiver,
                                                   clock: FixedClock, database_url: str) -> None:
    add_followup(rules_dir, "- {channel: webhook, endpoint: paging}")
    service = make_client(database_url=database_url, **settings(receiver))
    pid = new_patient()
    card = fire(service, fhir_server, clock, pid)
    assert [(o.outcome, o.target) for o in service.send_outbox() if o.card_uuid == card] == [("sent", "webhook:paging")]
    assert [o for o in service.send_outbox() if o.card_uuid == card] == []
    [(headers, body, verified)] = receiver.received
    assert verified, "the receiver could not verify the signature"
    assert headers["webhook-id"] == card
    assert headers["Content-Type"] == "application/cloudevents+json; charset=utf-8"
    event = orjson.loads(body)
    assert {k: event[k] for k in ("specversion", "id", "type", "source", "subject", "datacontenttype")} == {
        "specversion": "1.0", "id": card, "type": "org.nudges.card.fired.v1",
        "source": f"urn:nudges:rule:{TROPONIN_RULE}", "subject": TROPONIN_RULE, "datacontenttype": "application/json"}
    data = event["data"]
    assert data["patient"] == {"reference": f"Patient/{pid}"} and data["about"] == {"reference": "Observation/trop-1"}
    assert data["card"]["uuid"] == card and data["priority"] == "urgent" and data["fhirServer"] == fhir_server.base
    assert data["card"]["suggestions"][0]["actions"][0]["resource"]["subject"] == {"reference": f"Patient/{pid}"}
    row = delivery(service, card)
    assert (row.status, row.location, row.payload) == ("sent", "204", {})
    assert not waiting(service, pid, card)  # acknowledged: not shown again at the next visit


def test_an_acknowledged_push_holds_the_chart_like_a_card_shown(make_client: Callable[..., LiveServer],
                                                                rules_dir: Path, fhir_server: FhirServer,
                                                                receiver: Receiver, clock: FixedClock) -> None:
    """Opening the chart right after the page does not show the same nudge live; later it does, like any
    card shown and not answered (suppression.ignored)."""
    add_followup(rules_dir, "- {channel: webhook, endpoint: paging}")
    service = make_client(**settings(receiver))
    pid = new_patient()
    card = fire(service, fhir_server, clock, pid)
    assert [o.outcome for o in service.send_outbox() if o.card_uuid == card] == ["sent"]
    data = next(r for r in fhir_server.resources if r.get("id") == "trop-1" and
                r.get("subject", {}).get("reference") == f"Patient/{pid}")

    def live() -> list[dict[str, Any]]:
        answer = service.post("/cds-services/nudges-patient-view", json=patient_view(pid, data))
        assert answer.status_code == 200, answer.text
        return [c for c in answer.json()["cards"] if c["summary"].startswith("Troponin")]

    assert live() == []
    clock.advance(minutes=6)
    assert len(live()) == 1


def test_webhook_failures_are_retried_with_backoff_then_dead(make_client: Callable[..., LiveServer], rules_dir: Path,
                                                             fhir_server: FhirServer, receiver: Receiver,
                                                             clock: FixedClock,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    add_followup(rules_dir, "- {channel: webhook, endpoint: paging}")
    service = make_client(**settings(receiver, max_attempts=4, retry_seconds=30))
    pid = new_patient()
    card = fire(service, fhir_server, clock, pid)
    receiver.statuses = [503]
    assert [o.outcome for o in service.send_outbox()] == ["retry"]
    row = delivery(service, card)
    assert (row.status, row.attempts, "503" in row.last_error) == ("failed", 1, True)
    assert followups.aware(row.due_at) == clock.now() + timedelta(seconds=30)
    assert service.send_outbox() == []  # not due yet
    clock.advance(seconds=30)
    receiver.delay = 3  # the receiver hangs past the endpoint's 1 s timeout
    assert [o.outcome for o in service.send_outbox()] == ["retry"]
    row = delivery(service, card)
    assert "did not answer within 1 s" in row.last_error
    assert followups.aware(row.due_at) == clock.now() + timedelta(seconds=60)  # doubled
    receiver.delay = 0
    clock.advance(seconds=60)
    receiver.statuses, receiver.retry_after = [429], "600"
    assert [o.outcome for o in service.send_outbox()] == ["retry"]
    assert followups.aware(delivery(service, card).due_at) == clock.now() + timedelta(seconds=600)  # as asked
    receiver.retry_after = None
    clock.advance(seconds=600)
    receiver.statuses = [500]
    assert [o.outcome for o in service.send_outbox()] == ["dead"]  # the fourth attempt was the last
    row = delivery(service, card)
    assert (row.status, row.attempts) == ("dead", 4) and "attempt 4" in row.last_error
    assert {h["webhook-id"] for h, _, _ in receiver.received} == {card}  # the same id on every attempt
    assert all(ok for _, _, ok in receiver.received)
    assert waiting(service, pid, card)  # never acknowledged: still shown at the next visit
    logged = caplog.text + str([r.__dict__ for r in caplog.records])
    assert "delivery dead" in logged and pid not in logged and SECRET not in logged  # nothing about the patient


def test_retry_after_in_either_form() -> None:
    """RFC 9110 allows seconds or an HTTP date; anything else leaves the back-off to the caller."""
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert retry_after(httpx.Headers({"Retry-After": "120"})) == 120
    assert 55 < (retry_after(httpx.Headers({"Retry-After": in_a_minute})) or 0) <= 60
    assert retry_after(httpx.Headers({"Retry-After": email.utils.formatdate(time.time() - 60, usegmt=True)})) == 0
    assert retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert retry_after(httpx.Headers({"Retry-After": "-5"})) is None
    assert retry_after(httpx.Headers()) is None


@pytest.mark.parametrize(("status", "reason"), [(410, "the endpoint is gone"), (400, "answered 400")])
def test_a_refusing_webhook_is_dead_at_once(make_client: Callable[..., LiveServer], rules_dir: Path,
                                            fhir_server: FhirServer, receiver: Receiver, clock: FixedClock,
                                            status: int, reason: str) -> None:
    add_followup(rules_dir, "- {channel: webhook, endpoint: paging}")
    service = make_client(**settings(receiver))
    card = fire(service, fhir_server, clock, new_patient())
    receiver.statuses = [status]
    assert [o.outcome for o in service.send_outbox()] == ["dead"]
    assert reason in delivery(service, card).last_error


# -- FHIR writes -----------------------------------------------------------------------------------------
def test_a_task_for_the_pool_after_a_server_error(make_client: Callable[..., LiveServer], rules_dir: Path,
                                                  fhir_server: FhirServer, clock: FixedClock) -> None:
    add_followup(rules_dir, "- {channel: task, owner: care-team, roles: [cardiologist], pool: cardiology-on-call, "
                            "due: 30min, code: {system: 'http://snomed.info/sct', code: '183519002', "
                            "display: Referral to cardiology service}}")
    service = make_client(**settings(sender="Device/nudges"))
    pid = new_patient()
    fhir_server.resources.append({"resourceType": "CareTeam", "id": "ct-1", "status": "active",
                                  "subject": {"reference": f"Patient/{pid}"}, "participant": [
                                      {"role": [{"coding": [{"code": "nurse"}]}],
                                       "member": {"reference": "Practitioner/rn"}}]})
    card = fire(service, fhir_server, clock, pid)
    fired_at = clock.now()
    fhir_server.write_statuses = [503]
    assert [o.outcome for o in service.send_outbox()] == ["retry"]
    assert "answered 503 to the Task create" in delivery(service, card).last_error
    clock.advance(seconds=30)
    assert [o.outcome for o in service.send_outbox()] == ["sent"]
    writes = [(path, headers, body) for path, headers, body in fhir_server.writes if path == "/fhir/Task"]
    assert len(writes) == 2 and all(
        h["If-None-Exist"] == f"identifier=urn:ietf:rfc:3986|urn:uuid:{card}" for _, h, _ in writes)
    task = writes[-1][2]
    Task.model_validate(task)
    assert task["owner"] == POOL  # no cardiologist on the care team: the pool
    assert task["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{card}"}]
    assert (task["status"], task["intent"], task["priority"]) == ("requested", "order", "urgent")
    assert task["for"] == {"reference": f"Patient/{pid}"} and task["focus"] == {"reference": "Observation/trop-1"}
    assert task["restriction"]["period"]["end"] == (fired_at + timedelta(minutes=30)).isoformat().replace("+00:00", "Z")
    assert task["code"]["coding"][0]["code"] == "183519002" and task["requester"] == {"reference": "Device/nudges"}
    assert task["description"].startswith("Troponin above")
    assert delivery(service, card).location == "Task/w2/_history/1"


def test_communication_to_the_attending_of_the_encounter(make_client: Callable[..., LiveServer], rules_dir: Path,
                                                         fhir_server: FhirServer, clock: FixedClock,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nudges")
    add_followup(rules_dir, "- {channel: communication, to: encounter-participants, roles: [ATND], "
                            "pool: cardiology-on-call}")
    service = make_client(**settings(rule_page_url="https://nudges.example.org/rules/{rule}"))
    pid = new_patient()
    fhir_server.resources.append(encounter("enc-1", pid, ("ATND", "Practitioner/dr-a"), ("CON", "Practitioner/dr-c"),
                                           ("ATND", "Practitioner/dr-a")))
    card = fire(service, fhir_server, clock, pid, with_encounter="enc-1")
    assert [o.outcome for o in service.send_outbox()] == ["sent"]
    [(_, _, message)] = [w for w in fhir_server.writes if w[0] == "/fhir/Communication"]
    assert message["recipient"] == [{"reference": "Practitioner/dr-a"}]
    assert message["encounter"] == {"reference": "Encounter/enc-1"}
    assert message["payload"][-1]["contentAttachment"]["url"] == f"https://nudges.example.org/rules/{TROPONIN_RULE}"
    assert message["sender"] == {"display": "nudges"}
    assert not waiting(service, pid, card)
    logged = caplog.text + str([r.__dict__ for r in caplog.records])
    assert "delivered" in logged and pid not in logged and "dr-a" not in logged


def test_no_attending_on_the_encounter_means_the_on_call_pool(make_client: Callable[..., LiveServer],
                                                              rules_dir: Path, fhir_server: FhirServer,
                                                              clock: FixedClock) -> None:
    add_followup(rules_dir, "- {channel: communication, to: encounter-participants, roles: [ATND], "
                            "pool: cardiology-on-call}")
    service = make_client(public_base_url="https://nudges.example.org", **settings())
    pid = new_patient()
    ended = {**encounter("enc-2", pid, ("ATND", "Practitioner/night-doc"), ("CON", "Practitioner/dr-c"))}
    ended["participant"][0]["period"] = {"end": "2026-03-02T07:00:00Z"}  # went off shift this morning
    fhir_server.resources.append(ended)
    fire(service, fhir_server, clock, pid, with_encounter="enc-2")
    assert [o.outcome for o in service.send_outbox()] == ["sent"]
    [(_, _, message)] = [w for w in fhir_server.writes if w[0] == "/fhir/Communication"]
    assert message["recipient"] == [POOL]
    assert message["payload"][-1]["contentAttachment"]["url"] == (f"https://nudges.example.org/console/rules/"
                                                                  f"{TROPONIN_RULE}")  # the rule's page


def test_nobody_to_address_is_dead_with_the_reason(make_client: Callable[..., LiveServer], rules_dir: Path,
                                                   fhir_server: FhirServer, clock: FixedClock) -> None:
    add_followup(rules_dir, "- {channel: communication, to: encounter-participants}")
    service = make_client(**settings())
    card = fire(service, fhir_server, clock, new_patient())  # the troponin names no encounter
    assert [o.outcome for o in service.send_outbox()] == ["dead"]
    reason = delivery(service, card).last_error
    assert "nobody to address (encounter-participants) and no pool to fall back on" in reason


def test_an_unreachable_server_is_retried_then_dead_listed_and_requeued(
        make_client: Callable[..., LiveServer], rules_dir: Path, fhir_server: FhirServer, clock: FixedClock,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_followup(rules_dir, "- {channel: communication, to: pool, pool: cardiology-on-call}")
    database = f"sqlite:///{tmp_path}/nudges.db"
    service = make_client(database_url=database, **settings(fhir_server="http://127.0.0.1:9/fhir", max_attempts=2))
    pid = new_patient()
    card = fire(service, fhir_server, clock, pid)
    assert [o.outcome for o in service.send_outbox()] == ["retry"]
    assert "unreachable (ConnectError)" in delivery(service, card).last_error
    clock.advance(seconds=30)
    assert [o.outcome for o in service.send_outbox()] == ["dead"]
    assert 'nudges_outbox{status="dead"} 1.0' in service.get("/metrics").text
    assert service.get("/readyz").json()["deliveries"]["dead"] == 1
    assert main(["deliveries", "list", "--database-url", database]) == 1
    listed = capsys.readouterr().out
    assert f"{TROPONIN_RULE} -> communication  after 2 attempt(s): attempt 2: FHIR server unreachable" in listed
    assert pid not in listed
    dead_id = delivery(service, card).id
    assert main(["deliveries", "retry", "--database-url", database, "--id", "999999"]) == 1  # a typo'd id
    answer = capsys.readouterr()
    assert "0 dead deliveries" in answer.out and "#999999 (no such delivery)" in answer.err
    assert main(["deliveries", "retry", "--database-url", database, "--id", str(dead_id)]) == 0
    assert "1 dead deliveries back in the outbox" in capsys.readouterr().out
    row = delivery(service, card)
    assert (row.status, row.attempts) == ("pending", 0)
    assert main(["deliveries", "retry", "--database-url", database, "--id", str(dead_id)]) == 1  # not dead now
    assert f"#{dead_id} (pending)" in capsys.readouterr().err


# -- exactly once across workers ---------------------------------------------------------------------------
def test_two_workers_claim_each_delivery_exactly_once_and_a_lease_runs_out(database_url: str,
                                                                          clock: FixedClock) -> None:
    stores = [Store(database_url, clock), Store(database_url, clock)]
    lease = timedelta(minutes=2)
    try:
        stores[0].migrate()
        tag = uuid.uuid4().hex[:8]
        with stores[0].engine.begin() as conn:
            outbox.enqueue(conn, [{"card_uuid": f"{tag}-{i}", "target": "communication", "channel": "communication",
                                   "rule_id": f"r-{tag}", "patient_hash": "h", "fhir_server": None, "payload": {}}
                                  for i in range(40)], clock.now())
        barrier = threading.Barrier(2)
        claimed: dict[str, list[str]] = {"w0": [], "w1": []}

        def work(name: str, store: Store) -> None:
            barrier.wait()
            while batch := outbox.claim_due(store, name, 3, clock.now(), lease):
                claimed[name] += [d.card_uuid for d in batch if d.rule_id == f"r-{tag}"]

        threads = [threading.Thread(target=work, args=item) for item in zip(claimed, stores, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        mine = [c for ids in claimed.values() for c in ids]
        assert sorted(mine) == sorted(f"{tag}-{i}" for i in range(40))  # every row, exactly once
        assert outbox.claim_due(stores[1], "w2", 100, clock.now() + lease - timedelta(seconds=1), lease) == []
        again = outbox.claim_due(stores[1], "w2", 100, clock.now() + lease + timedelta(seconds=1), lease)
        assert sorted(d.card_uuid for d in again if d.rule_id == f"r-{tag}") == sorted(mine)  # the lease ran out
        assert all(d.attempts == 2 for d in again if d.rule_id == f"r-{tag}")
        late = next(d for d in again if d.rule_id == f"r-{tag}")
        with stores[0].engine.begin() as conn:  # the first worker comes back: the row is no longer its own
            assert not outbox.mark_sent(conn, late, "w0" if late.card_uuid in claimed["w0"] else "w1", None,
                                        clock.now())
    finally:
        for store in stores:
            store.dispose()


def test_a_card_that_fires_twice_queues_its_deliveries_once(make_client: Callable[..., LiveServer], rules_dir: Path,
                                                            fhir_server: FhirServer, receiver: Receiver,
                                                            clock: FixedClock) -> None:
    """A card already waiting for the patient makes the next follow-up of that rule queue nothing."""
    path = add_followup(rules_dir, "- {channel: webhook, endpoint: paging}")
    path.write_text(path.read_text().replace("\nsuppress: 12h\n", "\n"))
    service = make_client(**settings(receiver))
    pid = new_patient()
    fire(service, fhir_server, clock, pid)
    second = {**troponin("trop-2", when=(clock.now() - timedelta(hours=1)).isoformat()),
              "subject": {"reference": f"Patient/{pid}"}}
    fhir_server.resources.append(second)
    url = f"{fhir_server.base}/Observation/trop-2"
    service.post("/fhir/notifications", json={"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {"resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": f"{fhir_server.base}/Subscription/s"}},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "notification-event", "part": [{"name": "focus", "valueReference": {"reference": url}}]}]}},
        {"fullUrl": url, "resource": second}]})
    clock.advance(hours=12)
    assert [o.outcome for o in service.run_due()] == ["waiting"]
    assert outbox.counts(service.runtime.store)["pending"] == 1


ANALGESIA_RULE = """id: ed-analgesia-clock
title: Emergency visit with no analgesic after 60 minutes
status: active
version: 1.0.0
hooks: [encounter-start, patient-view]
topic: pain-care
owner: tests
when:
  all:
    - as: visit
      resource: Encounter
      where: "class.code = 'EMER' and status = 'in-progress'"
      within: 24h
      older_than: 60min
  none:
    - resource: MedicationAdministration
      since: visit
card:
  summary: "No analgesic {{visit.elapsed}} after arrival"
  indicator: warning
rationale: The clock starts at arrival; the emergency team hears about it at 60 minutes.
citations: [{title: NHLBI expert panel 2014, doi: 10.1001/jama.2014.10517}]
falsepositives: [An analgesic charted late.]
followup:
  start: visit
  after: 60min
  deliver:
    - {channel: communication, to: encounter-participants, roles: [ATND, PPRF], pool: emergency-team}
"""
ANALGESIA_CASES = """rule: ed-analgesia-clock
now: "2026-03-02T12:00:00Z"
cases:
  - name: 61 min after arrival, nothing given
    hook: patient-view
    resources:
      - {resourceType: Encounter, id: v1, status: in-progress, class: {code: EMER},
         period: {start: "2026-03-02T10:59:00Z"}, subject: {reference: Patient/p}}
    expect: [{indicator: warning}]
  - name: given at 30 min
    hook: patient-view
    resources:
      - {resourceType: Encounter, id: v1, status: in-progress, class: {code: EMER},
         period: {start: "2026-03-02T10:59:00Z"}, subject: {reference: Patient/p}}
      - {resourceType: MedicationAdministration, id: m1, status: completed, subject: {reference: Patient/p},
         medicationCodeableConcept: {text: morphine}, effectiveDateTime: "2026-03-02T11:29:00Z"}
    expect: []
"""


@pytest.mark.parametrize("given", [False, True], ids=["nothing-given", "analgesic-given"])
def test_a_clock_from_arrival_reaches_the_emergency_team(make_client: Callable[..., LiveServer], rules_dir: Path,
                                                         fhir_server: FhirServer, clock: FixedClock,
                                                         given: bool) -> None:
    """A follow-up that starts from the visit itself (an Encounter): 60 minutes after the arrival was
    notified, the participants of that encounter are told, unless an analgesic was given meanwhile."""
    (rules_dir / "pain").mkdir()
    (rules_dir / "pain" / "ed-analgesia-clock.yaml").write_text(ANALGESIA_RULE)
    (rules_dir / "pain" / "ed-analgesia-clock.cases.yaml").write_text(ANALGESIA_CASES)
    service = make_client(**{**settings(), "delivery": {"poll_seconds": 0, "pools": {
        "emergency-team": {"reference": "Group/ed-team"}}}})
    pid = new_patient()
    visit = {**encounter("v1", pid, ("ATND", "Practitioner/ed-doc"), ("PPRF", "Practitioner/ed-nurse"),
                         ("ADM", "Practitioner/admitter")),
             "period": {"start": (clock.now() - timedelta(minutes=1)).isoformat()}}
    fhir_server.resources += [patient(pid), visit]
    url = f"{fhir_server.base}/Encounter/v1"
    answer = service.post("/fhir/notifications", json={"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {"resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": f"{fhir_server.base}/Subscription/ed"}},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "notification-event", "part": [{"name": "focus", "valueReference": {"reference": url}}]}]}},
        {"fullUrl": url, "resource": visit}]})
    assert answer.json()["scheduled"] == 1, answer.text
    if given:
        fhir_server.resources.append({"resourceType": "MedicationAdministration", "id": "m1", "status": "completed",
                                      "subject": {"reference": f"Patient/{pid}"},
                                      "medicationCodeableConcept": {"text": "morphine"},
                                      "effectiveDateTime": (clock.now() + timedelta(minutes=30)).isoformat()})
    clock.advance(minutes=59)
    assert [o.outcome for o in service.run_due()] == []
    clock.advance(minutes=1)
    assert [o.outcome for o in service.run_due()] == (["quiet"] if given else ["fired"])
    assert [o.outcome for o in service.send_outbox()] == ([] if given else ["sent"])
    sent = [w[2] for w in fhir_server.writes if w[0] == "/fhir/Communication"]
    if given:
        assert sent == []
        return
    [message] = sent
    assert message["recipient"] == [{"reference": "Practitioner/ed-doc"}, {"reference": "Practitioner/ed-nurse"}]
    assert message["encounter"] == {"reference": "Encounter/v1"} and message["about"] == [{"reference": "Encounter/v1"}]
    assert message["payload"][0] == {"contentString": "No analgesic 61 min after arrival"}
