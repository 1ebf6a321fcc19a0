"""CDS Hooks protocol through the real HTTP app: discovery, hook calls, errors, health, CORS."""

from __future__ import annotations

import functools
import re
import time
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from conftest import LiveServer
from helpers import (
    ALLOWED_TOKEN,
    assert_no_empty,
    assert_valid_card,
    bundle,
    full_prefetch,
    patient,
    patient_view,
    plan_keys,
    troponin,
)

from nudges.hooks import HOOK_NAMES as HOOKS

URL = "/cds-services/nudges-patient-view"


def outcome(response) -> str:  # type: ignore[no-untyped-def]
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert response.headers["content-type"].startswith("application/fhir+json")
    return str(body["issue"][0]["diagnostics"])


def test_discovery_lists_all_six_hooks_with_versions(client: LiveServer) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    services = response.json()["services"]
    assert sorted(s["hook"] for s in services) == sorted(HOOKS)
    for service in services:
        assert_no_empty(service)
        assert {"id", "hook", "title", "description", "prefetch", "version", "hookVersion"} <= set(service)
        assert re.match(r"^\d+\.\d+\.\d+\+[0-9a-f]{8}$", service["version"])
        for template in service["prefetch"].values():
            tokens = re.findall(r"\{\{[^}]*\}\}", template)
            assert all(ALLOWED_TOKEN.fullmatch(t) for t in tokens), template
            assert "draftOrders" not in template and "selections" not in template
            parts = urlsplit(template)
            for name, _ in parse_qsl(parts.query):
                assert name in {"patient", "code", "vaccine-code", "_count", "_sort", "date"}, template


def test_patient_view_returns_valid_card(client: LiveServer) -> None:
    response = client.post(URL, json=patient_view("pt-1", troponin()))
    assert response.status_code == 200
    cards = response.json()["cards"]
    assert len(cards) == 1
    assert_valid_card(cards[0])
    assert "14 h ago" in cards[0]["summary"]
    assert cards[0]["suggestions"][0]["actions"][0]["resource"]["subject"]["reference"] == "Patient/pt-1"


def test_demographics_that_are_not_objects_do_not_break_a_call(client: LiveServer) -> None:
    """The audit's bucket reads the race extension, the language and the coverage type: a string where an
    object belongs is an unknown group, not a 500."""
    odd = patient("pt-odd", extension=[{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                                        "extension": [{"url": "ombCategory", "valueCoding": "2106-3"}]}],
                  communication=[{"language": "en", "preferred": True}])
    prefetch = full_prefetch("patient-view", odd, {**troponin(), "subject": {"reference": "Patient/pt-odd"}})
    prefetch["coverage"] = bundle({"resourceType": "Coverage", "id": "c", "status": "active", "type": "medicaid",
                                   "beneficiary": {"reference": "Patient/pt-odd"}, "payor": [{"display": "x"}]})
    response = client.post(URL, json=patient_view("pt-odd", prefetch=prefetch))
    assert response.status_code == 200, response.text
    assert len(response.json()["cards"]) == 1


def test_no_guidance_is_empty_cards(client: LiveServer) -> None:
    response = client.post(URL, json=patient_view("pt-1", troponin(value=5)))
    assert response.json() == {"cards": []}


def test_fresh_uuid_per_call(client: LiveServer) -> None:
    first = client.post(URL, json=patient_view("pt-a", troponin())).json()["cards"][0]["uuid"]
    second = client.post(URL, json=patient_view("pt-b", troponin())).json()["cards"][0]["uuid"]
    assert first != second


def test_malformed_json_is_400(client: LiveServer) -> None:
    response = client.post(URL, content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "malformed JSON" in outcome(response)


def test_json_that_is_not_an_object_is_400(client: LiveServer) -> None:
    response = client.post(URL, content=b"[1, 2]")
    assert response.status_code == 400
    assert "JSON object" in outcome(response)


def test_unknown_service_is_404(client: LiveServer) -> None:
    response = client.post("/cds-services/nope", json=patient_view())
    assert response.status_code == 404
    assert "nope" in outcome(response)


def test_hook_not_matching_service_is_400(client: LiveServer) -> None:
    body = patient_view()
    body["hook"] = "order-sign"
    response = client.post(URL, json=body)
    assert response.status_code == 400
    assert "does not match" in outcome(response)


def test_missing_fields_are_named(client: LiveServer) -> None:
    body = patient_view()
    del body["hookInstance"]
    response = client.post(URL, json=body)
    assert response.status_code == 400
    assert "hookInstance" in outcome(response)
    body = patient_view()
    del body["context"]["patientId"]
    response = client.post(URL, json=body)
    assert response.status_code == 400 and "context.patientId" in outcome(response)
    order = {"hook": "order-sign", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p"}}
    response = client.post("/cds-services/nudges-order-sign", json=order)
    assert response.status_code == 400 and "context.draftOrders" in outcome(response)
    start = {"hook": "encounter-start", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p"}}
    response = client.post("/cds-services/nudges-encounter-start", json=start)
    assert response.status_code == 400 and "context.encounterId" in outcome(response)


def test_absurd_nesting_is_400_not_a_crash(client: LiveServer) -> None:
    body = b'{"hook": "patient-view", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = client.post(URL, content=body)
    assert response.status_code == 400
    assert "too deep" in outcome(response)
    assert client.get("/healthz").status_code == 200


def test_oversized_body_is_413(make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client(max_body_bytes=1000)
    response = client.post(URL, content=b"{" + b" " * 5000 + b"}")
    assert response.status_code == 413
    assert "exceeds" in outcome(response)

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(100):
            yield b" " * 100

    response = client.post(URL, content=chunks())  # no Content-Length: streamed and cut off
    assert response.status_code == 413


def test_null_prefetch_means_no_data(client: LiveServer) -> None:
    body = patient_view(prefetch=dict.fromkeys(plan_keys("patient-view")))
    assert client.post(URL, json=body).json() == {"cards": []}


def test_missing_prefetch_without_server_is_412(client: LiveServer) -> None:
    body = patient_view(prefetch={"patient": patient()})
    response = client.post(URL, json=body)
    assert response.status_code == 412
    assert "observation" in outcome(response)


def test_fetches_missing_keys_from_fhir_server_with_bearer(client: LiveServer, fhir_server) -> None:  # type: ignore[no-untyped-def]
    fhir_server.resources = [patient("pt-9"), troponin()]
    prefetch = full_prefetch("patient-view", patient("pt-9"))
    prefetch["observation"] = {"resourceType": "OperationOutcome", "issue": []}  # the client failed this key
    body = patient_view("pt-9", prefetch=prefetch)
    body["fhirServer"] = fhir_server.base
    body["fhirAuthorization"] = {"access_token": "secret-token", "token_type": "Bearer", "expires_in": 300,
                                 "scope": "patient/*.read", "subject": "nudges"}
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["cards"]) == 1
    paths = [p for p, _ in fhir_server.requests]
    assert any(p.startswith("/fhir/Observation?patient=pt-9") for p in paths)
    assert all(auth == "Bearer secret-token" for _, auth in fhir_server.requests)
    assert not any(p.startswith("/fhir/Patient") for p in paths)  # prefetched, not fetched again


def test_open_fhir_server_gets_no_authorization_and_pages_are_followed(client: LiveServer, fhir_server) -> None:  # type: ignore[no-untyped-def]
    fhir_server.page_size = 1
    fhir_server.resources = [troponin("t-old", value=5), troponin("t-high")]
    body = patient_view("pt-9", prefetch={"patient": patient("pt-9")})
    body["fhirServer"] = fhir_server.base
    response = client.post(URL, json=body)
    assert response.status_code == 200
    assert len(response.json()["cards"]) == 1  # the elevated result was on page 2
    assert all(auth is None for _, auth in fhir_server.requests)
    assert any("_offset=1" in p for p, _ in fhir_server.requests)


def test_a_search_continued_on_another_server_is_a_412_not_a_partial_record(client: LiveServer, fhir_server) -> None:  # type: ignore[no-untyped-def]
    """A `next` link to another origin is not followed (the call's token is for its own server), and the
    first page is not used as if it were all: a result on the pages left out reads as absent."""
    fhir_server.page_size = 1
    fhir_server.next_base = "http://127.0.0.2:9/fhir"
    fhir_server.resources = [troponin("t-old", value=5), troponin("t-high")]
    body = patient_view("pt-9", prefetch={"patient": patient("pt-9")})
    body["fhirServer"] = fhir_server.base
    response = client.post(URL, json=body)
    assert response.status_code == 412, response.text
    assert "continues on another server (http://127.0.0.2:9)" in response.text
    assert not any("_offset" in p for p, _ in fhir_server.requests)


def test_a_prefetch_of_one_page_is_read_whole_from_the_fhir_server(client: LiveServer, fhir_server) -> None:  # type: ignore[no-untyped-def]
    """The HL7 sandbox prefetches each search's first page (20 entries) with a `next` link: what is on
    a later page is not absent, so the service searches again, whole, when it may (fhirServer); without a
    server it uses the page it has (the 200 below), as a client that sent nothing more allows."""
    fhir_server.resources = [troponin("t-normal", value=5), troponin("t-high")]
    first_page = {"resourceType": "Bundle", "type": "searchset", "total": 2,
                  "link": [{"relation": "self", "url": f"{fhir_server.base}/Observation?patient=pt-9"},
                           {"relation": "next", "url": f"{fhir_server.base}/Observation?patient=pt-9&_offset=1"}],
                  "entry": [{"resource": troponin("t-normal", value=5)}]}
    prefetch = full_prefetch("patient-view", patient("pt-9"))
    prefetch["observation"] = first_page
    body = patient_view("pt-9", prefetch=prefetch, fhirServer=fhir_server.base)
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.text
    assert [c["summary"] for c in response.json()["cards"] if c["summary"].startswith("Troponin")]
    assert [p for p, _ in fhir_server.requests if p.startswith("/fhir/Observation?patient=pt-9")]
    assert not any(p.startswith("/fhir/Patient") for p, _ in fhir_server.requests)  # whole: not asked again

    alone = patient_view("pt-8", prefetch={**prefetch, "patient": patient("pt-8")})
    response = client.post(URL, json=alone)
    assert response.status_code == 200, response.text
    assert not [c for c in response.json()["cards"] if c["summary"].startswith("Troponin")]


def test_requests_to_one_fhir_server_are_bounded_and_reuse_connections(make_client, fhir_server) -> None:  # type: ignore[no-untyped-def]
    """A modest FHIR server with a small accept queue drops a dozen connections opened at once: the
    service queues them on a few keep-alive connections instead, within the same budget."""
    client = make_client(fhir_max_connections_per_server=2)
    fhir_server.delay = 0.05
    fhir_server.resources = [patient("pt-9"), troponin()]
    body = patient_view("pt-9", prefetch={})
    body["fhirServer"] = fhir_server.base
    missing = len(client.get("/cds-services").json()["services"][0]["prefetch"])
    assert missing >= 4
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.text
    assert len(fhir_server.requests) == missing
    assert fhir_server.max_in_flight == 2
    assert len(fhir_server.connections) <= 2
    client.post(URL, json=body)
    assert len(fhir_server.connections) <= 2  # the next call reuses them


def test_unreachable_fhir_server_is_a_quick_412(client: LiveServer) -> None:
    body = patient_view(prefetch={"patient": patient()})
    body["fhirServer"] = "http://127.0.0.1:9/fhir"
    start = time.monotonic()
    response = client.post(URL, json=body)
    assert response.status_code == 412
    assert time.monotonic() - start < 2.5
    assert "unreachable" in outcome(response) or "in time" in outcome(response)


def test_slow_fhir_server_is_cut_off_by_the_budget(make_client, fhir_server) -> None:  # type: ignore[no-untyped-def]
    client = make_client(fhir_timeout_seconds=0.5)
    fhir_server.delay = 3
    body = patient_view(prefetch={"patient": patient()})
    body["fhirServer"] = fhir_server.base
    start = time.monotonic()
    response = client.post(URL, json=body)
    assert response.status_code == 412
    assert time.monotonic() - start < 2.0


def test_ssrf_guards(make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client()
    body = patient_view(prefetch={"patient": patient()})
    body["fhirServer"] = "http://10.1.2.3/fhir"
    response = client.post(URL, json=body)
    assert response.status_code == 400 and "https" in outcome(response)
    body["fhirServer"] = "https://169.254.169.254/latest"
    assert client.post(URL, json=body).status_code == 400
    allow = make_client(fhir_server_allowlist=["https://ehr.example.org/fhir"])
    body["fhirServer"] = "https://evil.example.com/fhir"
    response = allow.post(URL, json=body)
    assert response.status_code == 400 and "allow-list" in outcome(response)


def test_cards_are_ordered_by_severity_then_rule(client: LiveServer) -> None:
    egfr = {"resourceType": "Observation", "id": "egfr", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "48643-1"}]},
            "effectiveDateTime": "2026-02-01T00:00:00Z", "valueQuantity": {"value": 50}}
    cards = client.post(URL, json=patient_view("pt-1", troponin(), egfr)).json()["cards"]
    assert [c["indicator"] for c in cards] == ["warning", "warning"]
    assert "CKD-EPI" in cards[0]["summary"] and "Troponin" in cards[1]["summary"]  # race-free-egfr < troponin-…


def test_same_record_with_only_race_changed_gets_same_cards(client: LiveServer) -> None:
    def summaries(race: str | None) -> list[tuple[str, str]]:
        pid = f"pt-{race or 'none'}"  # a fresh patient each time, so suppression does not interfere
        body = patient_view(pid, troponin())
        body["prefetch"]["patient"] = patient(pid, race=race)
        cards = client.post(URL, json=body).json()["cards"]
        return [(c["summary"], c["indicator"]) for c in cards]

    baseline = summaries(None)
    assert baseline
    for race in ("2054-5", "2106-3", "2028-9", "1002-5", "2076-8"):
        assert summaries(race) == baseline


def test_health_ready_and_metrics(client: LiveServer) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["rules"] and ready["database"] == "ok"
    for path in ("/healthz", "/readyz"):  # a load balancer's check may be a HEAD
        head = client.head(path)
        assert head.status_code == 200 and head.content == b"", (path, head.status_code)
    client.post(URL, json=patient_view("pt-1", troponin()))
    text = client.get("/metrics").text
    assert 'nudges_requests_total{service="nudges-patient-view",status="200"}' in text
    assert 'nudges_cards_total{rule="troponin-without-cath-plan"}' in text
    assert "nudges_request_seconds_bucket" in text


def test_cors_preflight_allows_authorization_on_post(make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client(cors_origins=["https://ehr.example.org"])
    response = client.options(URL, headers={"Origin": "https://ehr.example.org",
                                             "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "authorization,content-type"})
    assert response.status_code == 200
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    response = client.post(URL, json=patient_view("pt-1"), headers={"Origin": "https://ehr.example.org"})
    assert response.headers["access-control-allow-origin"] == "https://ehr.example.org"
    denied = client.options(URL, headers={"Origin": "https://other.example", "Access-Control-Request-Method": "POST"})
    assert denied.status_code == 400 and denied.headers["content-type"] == "application/fhir+json"  # as every 4xx
    assert denied.json()["issue"][0]["diagnostics"].startswith("Disallowed CORS origin: the service's cors_origins")


def test_order_sign_and_appointment_book(client: LiveServer) -> None:
    order = {"resourceType": "ServiceRequest", "id": "d1", "status": "draft", "intent": "order",
             "subject": {"reference": "Patient/p"},
             "code": {"coding": [{"system": "http://loinc.org", "code": "88293-6"}]}}
    body = {"hook": "order-sign", "hookInstance": "h1",
            "context": {"userId": "Practitioner/1", "patientId": "p", "draftOrders": bundle(order)},
            "prefetch": full_prefetch("order-sign", patient("p"))}
    response = client.post("/cds-services/nudges-order-sign", json=body)
    assert response.status_code == 200, response.text
    assert [c["summary"][:4] for c in response.json()["cards"]] == ["eGFR"]
    appt = {"resourceType": "Appointment", "id": "a1", "status": "proposed", "participant": [
        {"actor": {"reference": "Patient/p"}, "status": "needs-action"}]}
    lang = patient("p", communication=[{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "vi"}]},
                                        "preferred": True}])
    body = {"hook": "appointment-book", "hookInstance": "h2",
            "context": {"userId": "Practitioner/1", "patientId": "p", "appointments": bundle(appt)},
            "prefetch": full_prefetch("appointment-book", lang)}
    response = client.post("/cds-services/nudges-appointment-book", json=body)
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert len(cards) == 1 and "interpreter" in cards[0]["summary"]
    assert orjson.dumps(cards)  # serialisable, no NaN


def test_a_connection_is_closed_after_keepalive_requests(make_client) -> None:  # type: ignore[no-untyped-def]
    """The third answer on one connection says Connection: close and the connection ends, so the client
    re-connects (to whichever worker accepts); with 0, a connection is never closed by the count."""
    import http.client

    client = make_client(keepalive_requests=3)
    port = int(str(client.base_url).rsplit(":", 1)[1].strip("/"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    said = []
    for n in range(3):
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        said.append(response.getheader("connection"))
        if n == 0:
            first = conn.sock.getsockname()
    assert said[:2] == [None, None] and said[2] == "close"
    assert conn.sock is None  # http.client drops a connection the server closes
    conn.request("GET", "/healthz")  # a new connection, counted afresh
    response = conn.getresponse()
    response.read()
    assert response.status == 200 and response.getheader("connection") is None
    assert conn.sock.getsockname() != first
    conn.close()

    never = make_client(keepalive_requests=0)
    port = int(str(never.base_url).rsplit(":", 1)[1].strip("/"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(5):
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        assert response.getheader("connection") is None
    conn.close()


def _drop_connections(application: str) -> int:
    """What a PostgreSQL restart or failover does to the service's pooled connections, to them alone."""
    import psycopg
    from conftest import PG_BASE

    with psycopg.connect(PG_BASE, autocommit=True) as conn:  # each backend waited for (up to 5 s) until gone
        return len(conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                                "WHERE application_name = %s", (application,)).fetchall())


@pytest.mark.parametrize("idle", ["in steady use", "idle"])
def test_a_hook_call_survives_the_database_dropping_its_connections(
        make_client, pg_schema_url: str, monkeypatch: pytest.MonkeyPatch, idle: str) -> None:  # type: ignore[no-untyped-def]
    """Dropped while in steady use (used again within PING_IDLE_SECONDS, so not pinged), the call's
    transaction is tried once more; dropped while idle, the ping at checkout replaces the connection,
    for feedback as for a hook call."""
    from nudges import store

    monkeypatch.setattr(store, "PING_IDLE_SECONDS", 3600.0 if idle == "in steady use" else 0.0)
    application = f"nudges_drop_{idle.replace(' ', '_')}"
    client = make_client(database_url=f"{pg_schema_url}&application_name={application}")
    first = client.post(URL, json=patient_view(f"pt-{idle.split()[-1]}-1", troponin()))
    assert first.status_code == 200 and first.json()["cards"]
    assert _drop_connections(application) >= 1
    again = client.post(URL, json=patient_view(f"pt-{idle.split()[-1]}-2", troponin()))
    assert again.status_code == 200 and again.json()["cards"], again.text
    if idle == "idle":
        _drop_connections(application)
        card = again.json()["cards"][0]
        accepted = {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-03-02T12:00:00Z",
                    "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}
        feedback = {"feedback": [accepted]}
        assert client.post(f"{URL}/feedback", json=feedback).status_code == 200


def test_the_hook_lane_takes_hook_calls_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """HookLane answers POST /cds-services/{id} ahead of FastAPI's router (under a root path too);
    every other request, a service's feedback included, goes on to the app."""
    import asyncio

    from starlette.responses import Response

    from nudges.api.routes import services

    answered: list[str] = []

    async def answer(_runtime: object, _request: object, service_id: str) -> Response:
        answered.append(service_id)
        return Response(b"{}", media_type="application/json")

    async def app(scope: dict, _receive: object, _send: object) -> None:  # type: ignore[type-arg]
        answered.append("app:" + scope["path"])

    async def send(_message: object) -> None:
        pass

    monkeypatch.setattr(services, "answer_call", answer)
    lane = services.HookLane(app)
    state = type("State", (), {"runtime": None})

    def request(method: str, path: str, root: str = "", kind: str = "http") -> None:
        scope = {"type": kind, "method": method, "path": path, "root_path": root, "headers": [],
                 "query_string": b"", "app": type("App", (), {"state": state})}
        asyncio.run(lane(scope, None, send))  # type: ignore[arg-type]

    request("POST", "/cds-services/nudges-patient-view")
    request("POST", "/nudges/cds-services/nudges-order-sign", root="/nudges")
    request("POST", "/cds-services/nudges-patient-view/feedback")
    request("POST", "/cds-services/")
    request("GET", "/cds-services/nudges-patient-view")
    request("POST", "/fhir/notifications")
    request("POST", "/cds-services/x", kind="websocket")
    assert answered == ["nudges-patient-view", "nudges-order-sign", "app:/cds-services/nudges-patient-view/feedback",
                        "app:/cds-services/", "app:/cds-services/nudges-patient-view", "app:/fhir/notifications",
                        "app:/cds-services/x"]


def test_a_crash_in_a_hook_call_is_a_500_outcome_and_the_service_goes_on(
        client: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_args: object) -> None:
        raise RuntimeError("PHI-looking detail pt-secret")

    good = client.post(URL, json=patient_view("pt-1"))
    monkeypatch.setattr(client.runtime, "evaluate", crash)
    response = client.post(URL, json=patient_view("pt-1"))
    assert response.status_code == 500 and outcome(response) == "internal error"
    assert "pt-secret" not in response.text
    monkeypatch.undo()
    assert client.post(URL, json=patient_view("pt-2")).status_code == 200 == good.status_code
    wrong = client.get(URL)  # not a hook call: FastAPI's router answers, with the same kind of error
    assert wrong.status_code == 405 and outcome(wrong) and wrong.headers["allow"] == "POST"


def test_a_call_is_answered_503_at_once_while_the_database_is_out_of_reach(
        make_client, pg_schema_url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL refusing the service's connections (down, failing over, its role locked): a hook call
    and feedback are a 503 OperationOutcome within DATABASE_WAIT_SECONDS (the pools' default had held
    each for 30 s, then answered 500), and the service answers again once the database is back."""
    import secrets

    import psycopg
    from conftest import PG_BASE

    from nudges import store

    monkeypatch.setattr(store, "DATABASE_WAIT_SECONDS", 0.5)
    role = f"nudges_outage_{secrets.token_hex(3)}"  # the service's own role, locked out alone
    admin = functools.partial(psycopg.connect, PG_BASE, autocommit=True)
    with admin() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    parts = urlsplit(PG_BASE)
    url = parts._replace(scheme="postgresql+psycopg", netloc=f"{role}@{parts.hostname}:{parts.port or 5432}",
                         query=f"options=-csearch_path%3D{role}").geturl()
    client = make_client(database_url=url)
    try:
        first = client.post(URL, json=patient_view("pt-outage-1", troponin()))
        assert first.status_code == 200 and first.json()["cards"], first.text
        card = first.json()["cards"][0]
        with admin() as conn:
            conn.execute(f"ALTER ROLE {role} NOLOGIN")
            # waits (up to 5 s) until each backend has exited: a signalled backend can still answer a statement
            # or two, and the next call then succeeded on it (seen once on a loaded CI machine)
            conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s", (role,))
        for path, body in ((URL, patient_view("pt-outage-2", troponin())),
                           (f"{URL}/feedback", {"feedback": [{
                               "card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-03-02T12:00:00Z",
                               "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}]})):
            start = time.monotonic()
            down = client.post(path, json=body)
            assert down.status_code == 503 and time.monotonic() - start < 5, (path, down.status_code, down.text)
            assert down.headers["retry-after"] == "5"
            assert down.json()["issue"][0]["code"] == "transient" and "try again" in down.text
        outage = time.monotonic() + 8  # long enough for psycopg_pool's doubling retry pause to reach 8 s
        while time.monotonic() < outage:
            assert client.post(URL, json=patient_view("pt-outage-2", troponin())).status_code == 503
        with admin() as conn:
            conn.execute(f"ALTER ROLE {role} LOGIN")
        back_at = time.monotonic()  # the database is back: so is the service, at once (it had lagged by 30 s)
        while (back := client.post(URL, json=patient_view("pt-outage-3", troponin()))).status_code == 503:
            assert time.monotonic() - back_at < 3, "the service lagged behind its database's return"
        assert back.status_code == 200 and back.json()["cards"], back.text
    finally:
        client.stop()
        with admin() as conn:
            # waits (up to 5 s) until each backend has exited: a signalled backend can still answer a statement
            # or two, and the next call then succeeded on it (seen once on a loaded CI machine)
            conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s", (role,))
            conn.execute(f"DROP SCHEMA {role} CASCADE")
            conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize(("headers", "refused"), [
    ({"Content-Type": "text/plain;charset=UTF-8"}, "'text/plain' is not JSON"),  # a cross-site fetch()
    ({"Content-Type": "application/x-www-form-urlencoded"}, "'application/x-www-form-urlencoded' is not JSON"),
    ({"Content-Type": "multipart/form-data; boundary=x"}, "'multipart/form-data' is not JSON"),
    ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, "send the body uncompressed"),
    ({"Content-Type": "application/fhir+json; charset=utf-8"}, None), ({"Content-Type": "Application/JSON"}, None),
    ({}, None),  # no type at all: a script's request, not a browser's
])
def test_bodies_that_are_not_json_are_a_415(client: LiveServer, headers: dict[str, str], refused: str | None) -> None:
    """Hook calls and feedback take JSON only: a form or text/plain is what any web page can POST across
    sites without a CORS preflight (feedback had been stored so), and gzip was read as malformed JSON."""
    call = orjson.dumps(patient_view(f"pt-media-{len(headers)}-{len(refused or '')}", troponin()))
    feedback = orjson.dumps({"feedback": [{"card": "c", "outcome": "overridden", "overrideReason": {"userComment": "-"},
                                           "outcomeTimestamp": "2026-03-02T12:00:00Z"}]})
    for path, body in ((URL, call), (f"{URL}/feedback", feedback)):
        answer = client.post(path, content=body, headers=headers)
        if refused is None:
            assert answer.status_code in (200, 400), answer.text  # read as JSON (the feedback's card is unknown)
            assert "is not JSON" not in answer.text
        else:
            assert answer.status_code == 415 and refused in answer.json()["issue"][0]["diagnostics"], answer.text


def test_readiness_counts_the_rules_served_not_all_loaded(make_client) -> None:  # type: ignore[no-untyped-def]
    """rule_count and nudges_rules_loaded had counted every loaded rule, experimental ones included."""
    client = make_client(rule_statuses=["experimental"])  # the test rules are all active: none served
    ready = client.get("/readyz").json()
    assert ready["rule_count"] == 0 and len(client.runtime.services().ruleset.rules) == 3, ready
    assert "nudges_rules_loaded 0.0" in client.get("/metrics").text


def test_an_access_log_is_there_when_asked_for_and_carries_no_query_or_patient(make_client,  # type: ignore[no-untyped-def]
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """`access_log: true`: a line per request (method, path, status, milliseconds, client address) in the
    service's log format, for operators' request logs; never a query string or anything from the body."""
    caplog.set_level("INFO", logger="nudges.access")
    quiet = make_client()
    assert quiet.post(URL, json=patient_view("pt-secret-1", troponin())).status_code == 200
    assert not [r for r in caplog.records if r.name == "nudges.access"]  # off by default: the hot path's
    logged = make_client(access_log=True)
    assert logged.post(URL + "?patient=pt-secret-2", json=patient_view("pt-secret-2", troponin())).status_code == 200
    assert logged.get("/healthz").status_code == 200
    assert logged.post("/cds-services/no-such-service", json={}).status_code == 404
    deadline = time.monotonic() + 5  # a line is written once the answer has gone, in the server's thread
    while len(lines := [r for r in caplog.records if r.name == "nudges.access"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(r.method, r.path, r.status) for r in lines] == [  # type: ignore[attr-defined]
        ("POST", URL, 200), ("GET", "/healthz", 200), ("POST", "/cds-services/no-such-service", 404)]
    assert all(r.ms >= 0 and r.client == "127.0.0.1" for r in lines)  # type: ignore[attr-defined]
    assert "pt-secret" not in caplog.text and "patient=" not in caplog.text
