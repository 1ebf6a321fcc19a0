"""JWT-protected service through the real HTTP app: every endpoint, audience per URL, replay, tenant."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from conftest import LiveServer
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import patient_view, troponin
from jwt.algorithms import ECAlgorithm
from sqlalchemy import select

from nudges.settings import Settings
from nudges.store import cards

ISS = "https://ehr.example.org"
KID = "ehr-key-1"


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def secured(make_client, tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> LiveServer:  # type: ignore[no-untyped-def]
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=KID, alg="ES384", use="sig")
    (tmp_path / "jwks.json").write_bytes(orjson.dumps({"keys": [jwk]}))
    auth = {"clients": [{"iss": ISS, "jwks_file": str(tmp_path / "jwks.json"), "tenant": "north"}]}
    return make_client(auth=auth)  # type: ignore[no-any-return]


def token(key: ec.EllipticCurvePrivateKey, aud: str, now: float, **claims: Any) -> str:
    payload = {"iss": ISS, "aud": aud, "iat": int(now), "exp": int(now) + 300, "jti": str(uuid.uuid4()),
               "tenant": "north", **claims}
    return jwt.encode(payload, key, algorithm="ES384", headers={"kid": KID, "typ": "JWT"})


def now_of(server: LiveServer) -> float:
    return float(server.runtime.clock.now().timestamp())


def test_every_endpoint_requires_a_valid_token(secured: LiveServer, key: ec.EllipticCurvePrivateKey) -> None:
    base = str(secured.base_url)
    now = now_of(secured)
    for method, path in (("GET", "/cds-services"), ("POST", "/cds-services/nudges-patient-view"),
                         ("POST", "/cds-services/nudges-patient-view/feedback")):
        response = secured.request(method, path, json={})
        assert response.status_code == 401
        assert response.json()["resourceType"] == "OperationOutcome"
        assert response.json()["issue"][0]["diagnostics"] == "authentication required"  # no detail
    good = secured.get("/cds-services", headers={"Authorization": f"Bearer {token(key, base + '/cds-services', now)}"})
    assert good.status_code == 200


def test_signed_hook_call_and_feedback_round_trip(secured: LiveServer, key: ec.EllipticCurvePrivateKey) -> None:
    base = str(secured.base_url)
    now = now_of(secured)
    url = base + "/cds-services/nudges-patient-view"
    response = secured.post("/cds-services/nudges-patient-view", json=patient_view("pt-j", troponin()),
                            headers={"Authorization": f"Bearer {token(key, url, now)}"})
    assert response.status_code == 200
    card = response.json()["cards"][0]
    with secured.runtime.store.engine.connect() as conn:
        assert conn.execute(select(cards.c.tenant).where(cards.c.uuid == card["uuid"])).scalar() == "north"
    body = {"feedback": [{"card": card["uuid"], "outcome": "accepted",
                          "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                          "outcomeTimestamp": "2026-03-02T12:01:00Z"}]}
    # The hook URL is not the feedback URL: a token for one endpoint is refused at another.
    wrong = secured.post("/cds-services/nudges-patient-view/feedback", json=body,
                         headers={"Authorization": f"Bearer {token(key, url, now)}"})
    assert wrong.status_code == 401
    ok = secured.post("/cds-services/nudges-patient-view/feedback", json=body,
                      headers={"Authorization": f"Bearer {token(key, url + '/feedback', now)}"})
    assert ok.status_code == 200 and ok.json() == {"stored": 1, "duplicates": 0}


def test_replayed_token_is_refused(secured: LiveServer, key: ec.EllipticCurvePrivateKey) -> None:
    base = str(secured.base_url)
    header = {"Authorization": f"Bearer {token(key, base + '/cds-services', now_of(secured))}"}
    assert secured.get("/cds-services", headers=header).status_code == 200
    assert secured.get("/cds-services", headers=header).status_code == 401


def test_expired_and_foreign_tokens_are_refused(secured: LiveServer, key: ec.EllipticCurvePrivateKey) -> None:
    aud = str(secured.base_url) + "/cds-services"
    now = now_of(secured)
    expired = token(key, aud, now - 3600)
    assert secured.get("/cds-services", headers={"Authorization": f"Bearer {expired}"}).status_code == 401
    stranger = ec.generate_private_key(ec.SECP384R1())
    forged = token(stranger, aud, now)
    assert secured.get("/cds-services", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    hmac_token = jwt.encode({"iss": ISS, "aud": aud, "iat": int(now), "exp": int(now) + 60, "jti": "x"}, "s" * 48,
                            algorithm="HS256", headers={"kid": KID})
    assert secured.get("/cds-services", headers={"Authorization": f"Bearer {hmac_token}"}).status_code == 401


def test_public_base_url_is_the_audience_behind_a_proxy(make_client, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         key: ec.EllipticCurvePrivateKey) -> None:
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=KID, alg="ES384")
    (tmp_path / "jwks.json").write_bytes(orjson.dumps({"keys": [jwk]}))
    server = make_client(auth={"clients": [{"iss": ISS, "jwks_file": str(tmp_path / "jwks.json")}]},
                         public_base_url="https://nudges.example.org/cds")
    now = now_of(server)
    public = token(key, "https://nudges.example.org/cds/cds-services", now)
    assert server.get("/cds-services", headers={"Authorization": f"Bearer {public}"}).status_code == 200
    internal = token(key, str(server.base_url) + "/cds-services", now)
    assert server.get("/cds-services", headers={"Authorization": f"Bearer {internal}"}).status_code == 401


def test_feedback_validation_and_idempotence(client: LiveServer) -> None:
    card = client.post("/cds-services/nudges-patient-view", json=patient_view("pt-f", troponin())).json()["cards"][0]
    url = "/cds-services/nudges-patient-view/feedback"
    override = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-03-02T12:05:00Z",
                              "overrideReason": {"reason": card["overrideReasons"][0], "userComment": "done already"}}]}
    assert client.post(url, json=override).json() == {"stored": 1, "duplicates": 0}
    assert client.post(url, json=override).json() == {"stored": 0, "duplicates": 1}
    bad = [{"feedback": [{"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-03-02T12:05:00Z"}]},
           {"feedback": [{"card": card["uuid"], "outcome": "maybe", "outcomeTimestamp": "2026-03-02T12:05:00Z"}]},
           {"feedback": [{"card": card["uuid"], "outcome": "overridden", "overrideReason": {},
                          "outcomeTimestamp": "2026-03-02T12:05:00Z"}]},
           {"feedback": [{"card": "no-such-card", "outcome": "overridden",
                          "outcomeTimestamp": "2026-03-02T12:05:00Z"}]},
           {"feedback": []}, {"nope": 1}]
    for body in bad:
        response = client.post(url, json=body)
        assert response.status_code == 400, body
        assert response.json()["resourceType"] == "OperationOutcome"
    other = client.post("/cds-services/nudges-order-sign/feedback", json=override)
    assert other.status_code == 400  # the card was issued by another service


def test_logs_carry_no_tokens_or_patient_ids(client: LiveServer, capfd: pytest.CaptureFixture[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    body = patient_view("pt-secret-id-42", troponin())
    body["fhirServer"] = "http://127.0.0.1:9/fhir"
    body["fhirAuthorization"] = {"access_token": "tok-SECRET-123", "token_type": "Bearer", "expires_in": 60,
                                 "scope": "patient/*.read", "subject": "x"}
    del body["prefetch"]["observation"]
    response = client.post("/cds-services/nudges-patient-view", json=body)
    assert response.status_code == 412
    time.sleep(0.1)
    text = caplog.text + "".join(capfd.readouterr())
    assert "answered 412" in text and "unreachable" in text  # the call was logged, so absence below means something
    assert "tok-SECRET-123" not in text and "pt-secret-id-42" not in text


def test_a_pinned_clock_pins_the_rules_not_the_token_checks(tmp_path: Path, rules_dir: Path,
                                                            key: ec.EllipticCurvePrivateKey) -> None:
    """`now` (NUDGES_NOW) pins what the rules see, as in the README's quick start; a real CDS client
    (the HL7 sandbox, an EHR) signs its tokens at the real time, and a token of the pinned instant,
    months off, is refused."""
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=KID, alg="ES384", use="sig")
    (tmp_path / "jwks.json").write_bytes(orjson.dumps({"keys": [jwk]}))
    settings = Settings(rules=rules_dir, database_url=f"sqlite:///{tmp_path}/pinned.db", reload_interval_seconds=0,
                        now="2026-03-02T12:00:00Z",
                        auth={"clients": [{"iss": ISS, "jwks_file": str(tmp_path / "jwks.json"), "tenant": "north"}]})
    server = LiveServer(settings, None)
    try:
        url = str(server.base_url) + "/cds-services/nudges-patient-view"
        response = server.post("/cds-services/nudges-patient-view", json=patient_view("pt-p", troponin()),
                               headers={"Authorization": f"Bearer {token(key, url, time.time())}"})
        assert response.status_code == 200, response.text
        assert any(c["summary"].startswith("Troponin") for c in response.json()["cards"])  # the pinned windows
        pinned = server.runtime.clock.now().timestamp()
        stale = server.post("/cds-services/nudges-patient-view", json=patient_view("pt-p", troponin()),
                            headers={"Authorization": f"Bearer {token(key, url, pinned)}"})
        assert stale.status_code == 401
        assert abs(server.runtime.reloader.loaded_at.timestamp() - time.time()) < 300  # an operator's fact: real
    finally:
        server.stop()


def test_discovery_with_a_trailing_slash_is_answered_where_it_was_asked(secured: LiveServer,
                                                                        key: ec.EllipticCurvePrivateKey) -> None:
    """The HL7 sandbox calls the discovery URL exactly as typed; `/cds-services/` was redirected, and the
    second request's token (addressed to the URL with the slash) then refused."""
    url = str(secured.base_url) + "/cds-services/"
    response = secured.get("/cds-services/", headers={"Authorization": f"Bearer {token(key, url, now_of(secured))}"})
    assert response.status_code == 200, response.text
    assert len(response.json()["services"]) == 6


def test_a_hook_url_with_a_trailing_slash_is_answered_where_it_was_asked(secured: LiveServer,
                                                                         key: ec.EllipticCurvePrivateKey) -> None:
    """An EHR configured with `/cds-services/{id}/` gets the call answered there (its token is addressed to
    that URL), not a redirect its POST would not survive."""
    url = str(secured.base_url) + "/cds-services/nudges-patient-view/"
    response = secured.post("/cds-services/nudges-patient-view/", json=patient_view("pt-s", troponin()),
                            headers={"Authorization": f"Bearer {token(key, url, now_of(secured))}"})
    assert response.status_code == 200, response.text
    assert response.json()["cards"]


def test_feedback_with_a_trailing_slash_is_answered_where_it_was_asked(secured: LiveServer,
                                                                       key: ec.EllipticCurvePrivateKey) -> None:
    """`/cds-services/{id}/feedback/` was a 307 to the URL without the slash, whose token check then failed;
    feedback entries may carry the spec's `extension` member, as every CDS Hooks object may."""
    url = str(secured.base_url) + "/cds-services/nudges-patient-view"
    called = secured.post("/cds-services/nudges-patient-view", json=patient_view("pt-fs", troponin()),
                          headers={"Authorization": f"Bearer {token(key, url, now_of(secured))}"})
    card = called.json()["cards"][0]
    entry = {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-03-02T12:00:00Z",
             "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"], "extension": {"org.example.x": 1}}],
             "extension": {"org.example.ehr-user-role": "nurse"}}
    url += "/feedback/"
    response = secured.post("/cds-services/nudges-patient-view/feedback/",
                            json={"feedback": [entry], "extension": {"org.example.batch": "7"}},
                            headers={"Authorization": f"Bearer {token(key, url, now_of(secured))}"})
    assert response.status_code == 200, response.text
    assert response.json() == {"stored": 1, "duplicates": 0}
