"""The whole loop against a FHIR server the project did not write (sekmet-fhir, started here on
loopback, with SMART Backend Services on): `nudges subscriptions apply` → the server's handshake → a new
troponin → its notification → the follow-up due (the clock moved) → a Communication on the server,
exactly once, also when the service is killed between claiming the delivery and sending it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import LiveServer
from fhir.resources.R4B.communication import Communication
from helpers import TROPONIN_RULE, add_followup, backend_key, patient_view
from sekmet_fhir import TOPIC_URL, TROPONIN_TOPIC, Sekmet, running_sekmet, smart_settings, wait_for
from sqlalchemy import select, update

from nudges.cli import main
from nudges.clock import FixedClock
from nudges.events import followups, outbox, subscriptions
from nudges.events.channels import IDENTIFIER_SYSTEM
from nudges.fhir import instant
from nudges.store import Store

KID = "nudges-1"
POOL = "PractitionerRole/oncall-cardiology"
DELIVER = "- {channel: communication, to: encounter-participants, roles: [ATND], pool: cardiology-on-call}"
V3 = "http://terminology.hl7.org/CodeSystem"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return backend_key(tmp_path_factory.mktemp("keys"), KID)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, dict[str, Any]]) -> Iterator[Sekmet]:
    """One sekmet for the module; every test makes its own patients. `nudges-readonly` is the same key
    registered with read scopes only (a site that forgot to grant writes)."""
    readonly = {"client_id": "nudges-readonly", "jwks": keys[1], "scopes": "system/*.rs"}
    with running_sekmet(tmp_path_factory.mktemp("sekmet"), smart_settings(keys[1], extra_clients=[readonly])) as srv:
        srv.login()
        assert srv.http.put(f"/Basic/{TROPONIN_TOPIC['id']}", json=TROPONIN_TOPIC).status_code in (200, 201)
        yield srv


@pytest.fixture
def rules_dir(rules_dir: Path) -> Path:
    add_followup(rules_dir, DELIVER)
    return rules_dir


def settings_for(server: Sekmet, keys: tuple[Path, dict[str, Any]], client_id: str = "nudges",
                 scope: str = "system/*.cruds") -> dict[str, Any]:
    return {
        "followup_poll_seconds": 0, "fhir_timeout_seconds": 15,  # generous: the machine may be loaded
        "delivery": {"poll_seconds": 0, "pools": {"cardiology-on-call": {"reference": POOL,
                                                                         "display": "On-call cardiology"}}},
        "subscriptions": {"check_seconds": 0, "servers": [{"base": server.base, "topics": {"Observation": TOPIC_URL}}]},
        "fhir_backend_clients": [{"base": server.base, "token_url": server.token_url, "client_id": client_id,
                                  "private_key_file": str(keys[0]), "key_id": KID, "scope": scope}]}


def config_file(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(json.dumps(values, default=str))  # JSON is YAML
    return path


def chart(server: Sekmet) -> tuple[str, str, str]:
    """A patient in the emergency department: attending (ATND) and a consultant (CON) on the encounter."""
    pid = server.create({"resourceType": "Patient", "name": [{"family": "Loop"}]})["id"]
    doctor = server.create({"resourceType": "Practitioner", "name": [{"family": "Attending"}]})["id"]
    encounter = server.create({
        "resourceType": "Encounter", "status": "in-progress",
        "class": {"system": f"{V3}/v3-ActCode", "code": "EMER"}, "subject": {"reference": f"Patient/{pid}"},
        "participant": [
            {"type": [{"coding": [{"system": f"{V3}/v3-ParticipationType", "code": "ATND"}]}],
             "individual": {"reference": f"Practitioner/{doctor}"}},
            {"type": [{"coding": [{"system": f"{V3}/v3-ParticipationType", "code": "CON"}]}],
             "individual": {"reference": "Practitioner/consultant"}}]})["id"]
    return pid, doctor, encounter


def troponin_for(pid: str, encounter: str | None, clock: FixedClock) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "89579-7"}]},
        "effectiveDateTime": instant(clock.now() - timedelta(hours=1)), "valueQuantity": {"value": 212, "unit": "ng/L"},
        "referenceRange": [{"high": {"value": 34, "unit": "ng/L"}}]}
    if encounter:
        resource["encounter"] = {"reference": f"Encounter/{encounter}"}
    return resource


def rows(service: LiveServer | Store, table: Any, **where: Any) -> list[Any]:
    store = service if isinstance(service, Store) else service.runtime.store
    with store.engine.connect() as conn:
        return list(conn.execute(select(table).where(*(table.c[k] == v for k, v in where.items()))))


def communications(server: Sekmet, card_uuid: str) -> list[dict[str, Any]]:
    return server.search(f"Communication?identifier={IDENTIFIER_SYSTEM}|urn:uuid:{card_uuid}")


def fired_card(service: LiveServer, server: Sekmet, clock: FixedClock, pid: str, encounter: str | None) -> str:
    """Tell the service about a new troponin (as the server would, id-only), let 12 h pass, run the
    follow-up: the card fires and its delivery is queued. Returns the card uuid."""
    obs = server.create(troponin_for(pid, encounter, clock))
    note = {"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": f"{server.base}/Subscription/unmanaged"}},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "notification-event", "part": [
                {"name": "event-number", "valueString": "1"},
                {"name": "focus", "valueReference": {"reference": f"{server.base}/Observation/{obs['id']}"}}]}]}}]}
    answer = service.post("/fhir/notifications", json=note)
    assert answer.status_code == 200 and answer.json()["scheduled"] == 1, answer.text
    [row] = rows(service, followups.followups, patient_hash=service.runtime.store.patient_hash(pid))
    clock.advance(hours=12)
    assert [o.outcome for o in service.run_due() if o.id == row.id] == ["fired"]
    [pending] = rows(service, followups.pending_cards, patient_hash=service.runtime.store.patient_hash(pid))
    return str(pending.uuid)


def test_subscription_notification_followup_communication_exactly_once_across_a_crash(
        make_client: Callable[..., LiveServer], make_store: Callable[..., Store], server: Sekmet,
        keys: tuple[Path, dict[str, Any]], rules_dir: Path, tmp_path: Path, clock: FixedClock, database_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = {"database_url": database_url, "rules": str(rules_dir), **settings_for(server, keys)}
    service = make_client(**settings)
    endpoint = f"{str(service.base_url).rstrip('/')}/fhir/notifications"
    config = config_file(tmp_path / "config.yaml", {**settings, "subscriptions": {
        **settings["subscriptions"], "endpoint": endpoint}})

    # 1. The plan, then apply: the server handshakes with the running service, the subscription is active.
    assert main(["subscriptions", "plan", "--config", str(config)]) == 0
    assert f"  create      {TOPIC_URL}  (Observation; rules: {TROPONIN_RULE})" in capsys.readouterr().out
    assert main(["subscriptions", "apply", "--config", str(config)]) == 0
    assert "=> active" in capsys.readouterr().out
    store = service.runtime.store
    [managed] = [m for m in subscriptions.live(store) if m.server == server.base and m.endpoint == endpoint]
    assert managed.status == "active" and managed.resource_id
    remote = server.http.get(f"/Subscription/{managed.resource_id}").json()
    assert remote["status"] == "active" and remote["criteria"] == TOPIC_URL
    assert remote["channel"]["endpoint"] == endpoint
    assert remote["channel"]["_payload"]["extension"][0]["valueCode"] == "id-only"
    [header] = remote["channel"]["header"]
    assert header.startswith("Authorization: Bearer nsub_") and subscriptions.by_secret(store, header[22:]) is not None
    assert main(["subscriptions", "apply", "--config", str(config)]) == 0  # idempotent
    assert "  keep  " in capsys.readouterr().out
    assert len(subscriptions.live(store, server.base)) == 1

    # 2. A troponin on the server: notified (id-only), read back with the service's token, follow-up scheduled.
    pid, doctor, encounter = chart(server)
    obs = server.create(troponin_for(pid, encounter, clock))
    patient_hash = store.patient_hash(pid)
    [row] = wait_for(lambda: rows(service, followups.followups, patient_hash=patient_hash), what="the follow-up")
    assert (row.start_ref, row.fhir_server, row.status) == (f"Observation/{obs['id']}", server.base, "pending")
    assert wait_for(lambda: subscriptions.get(store, managed.id).last_event >= 1, what="the event counted")  # type: ignore[union-attr]

    # 3. Twelve hours later nothing has been ordered: the card fires and its Communication is queued.
    clock.advance(hours=12)
    assert [o.outcome for o in service.run_due() if o.id == row.id] == ["fired"]
    [pending] = rows(service, followups.pending_cards, patient_hash=patient_hash)
    card = str(pending.uuid)
    [queued] = rows(service, outbox.deliveries, card_uuid=card)
    assert (queued.status, queued.channel, queued.fhir_server) == ("pending", "communication", server.base)
    service.stop()
    reader = make_store()

    # 4. Another replica claims the delivery and is killed (SIGKILL) before the send completes: the server
    #    is paused, so its token request hangs.
    server.pause()
    crashed = config_file(tmp_path / "replica.yaml", {**settings, "port": 0, "fhir_timeout_seconds": 60,
                                                       "delivery": {**settings["delivery"], "poll_seconds": 0.1}})
    log = (tmp_path / "replica.log").open("wb")
    replica = subprocess.Popen([sys.executable, "-m", "nudges", "serve", "--config", str(crashed)], stderr=log,
                               stdout=log, env={**os.environ, "NUDGES_NOW": instant(clock.now())})
    try:
        wait_for(lambda: rows(reader, outbox.deliveries, card_uuid=card, status="sending"), 60, "the claim")
    finally:
        replica.kill()
        replica.wait()
        log.close()
        server.resume()
    [claimed] = rows(reader, outbox.deliveries, card_uuid=card)
    assert (claimed.status, claimed.attempts) == ("sending", 1) and claimed.claimed_by
    assert communications(server, card) == []

    # 5. Started again: once the dead replica's lease has run out the delivery is claimed and sent, once.
    restarted = make_client(**settings)
    def send() -> list[tuple[str, str]]:  # the PostgreSQL schema is shared by the session: only ours counts
        return [(o.outcome, o.target) for o in restarted.send_outbox() if o.card_uuid == card]

    assert send() == []  # still leased to the dead replica
    clock.advance(seconds=restarted.runtime.settings.delivery.lease_seconds + 1)
    assert send() == [("sent", "communication")]
    assert send() == []
    [sent] = rows(restarted, outbox.deliveries, card_uuid=card)
    assert (sent.status, sent.attempts, sent.payload) == ("sent", 2, {})
    [message] = communications(server, card)
    Communication.model_validate(message)
    assert message["recipient"] == [{"reference": f"Practitioner/{doctor}"}]  # the attending, not the consultant
    assert message["subject"] == {"reference": f"Patient/{pid}"}
    assert message["encounter"] == {"reference": f"Encounter/{encounter}"}
    assert message["about"] == [{"reference": f"Observation/{obs['id']}"}]
    assert (message["priority"], message["category"][0]["coding"][0]["code"]) == ("urgent", "alert")
    assert message["payload"][0]["contentString"].startswith("Troponin above its reference range")
    assert sent.location.startswith(f"Communication/{message['id']}")

    # 6. Acknowledged, so the card no longer waits for the next hook call: nobody sees the nudge twice.
    view = restarted.post("/cds-services/nudges-patient-view", json=patient_view(pid))
    assert view.status_code == 200 and not [c for c in view.json()["cards"] if c["uuid"] == card]
    [taken] = rows(restarted, followups.pending_cards, uuid=card)
    assert taken.delivered_at is not None and taken.card == {}


def test_a_lost_answer_resent_finds_the_communication_already_there(
        make_client: Callable[..., LiveServer], server: Sekmet, keys: tuple[Path, dict[str, Any]],
        clock: FixedClock) -> None:
    """The server wrote it but the answer never came back: the row is sent again, the conditional create
    (If-None-Exist on the card's uuid) answers 200 with the existing one."""
    service = make_client(**settings_for(server, keys))
    pid, _, encounter = chart(server)
    card = fired_card(service, server, clock, pid, encounter)
    with service.runtime.store.engine.connect() as conn:
        payload = conn.execute(select(outbox.deliveries.c.payload)
                               .where(outbox.deliveries.c.card_uuid == card)).scalar()
    assert [o.outcome for o in service.send_outbox()] == ["sent"]
    with service.runtime.store.engine.begin() as conn:  # as if the acknowledgement had been lost
        conn.execute(update(outbox.deliveries).where(outbox.deliveries.c.card_uuid == card)
                     .values(status="pending", payload=payload))
    assert [o.outcome for o in service.send_outbox()] == ["sent"]
    assert len(communications(server, card)) == 1


def test_refusals_are_dead_and_seen_in_metrics_and_readyz(
        make_client: Callable[..., LiveServer], server: Sekmet, keys: tuple[Path, dict[str, Any]],
        clock: FixedClock) -> None:
    """A token without write scope (403), and criteria matching two resources (412): retrying cannot
    help, so each delivery is dead at once, with the server's reason, counted, and left in the outbox."""
    service = make_client(**settings_for(server, keys, client_id="nudges-readonly", scope="system/*.rs"))
    pid, _, encounter = chart(server)
    card = fired_card(service, server, clock, pid, encounter)
    assert [o.outcome for o in service.send_outbox()] == ["dead"]
    [row] = rows(service, outbox.deliveries, card_uuid=card)
    assert row.status == "dead" and "403" in row.last_error and row.payload
    assert communications(server, card) == []
    metrics = service.get("/metrics").text
    assert 'nudges_outbox{status="dead"} 1.0' in metrics
    assert 'nudges_deliveries_total{channel="communication",outcome="dead"} 1.0' in metrics
    ready = service.get("/readyz")
    assert ready.status_code == 200 and ready.json()["deliveries"]["dead"] == 1
    assert any("1 dead deliveries" in w for w in ready.json()["warnings"])
    # Never acknowledged, so the card still waits for the patient's next hook call: nothing is lost.
    view = service.post("/cds-services/nudges-patient-view", json=patient_view(pid))
    assert [c["uuid"] for c in view.json()["cards"] if c["uuid"] == card] == [card]

    writer = make_client(**settings_for(server, keys))  # a second card, whose identifier two resources carry
    pid, _, encounter = chart(server)
    card = fired_card(writer, server, clock, pid, encounter)
    for _ in range(2):
        server.create({"resourceType": "Communication", "status": "completed",
                       "subject": {"reference": f"Patient/{pid}"},
                       "identifier": [{"system": IDENTIFIER_SYSTEM, "value": f"urn:uuid:{card}"}]})
    assert [o.outcome for o in writer.send_outbox()] == ["dead"]
    [row] = rows(writer, outbox.deliveries, card_uuid=card)
    assert "412" in row.last_error and len(communications(server, card)) == 2
