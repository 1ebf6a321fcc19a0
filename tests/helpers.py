"""Builders for hook requests and checks every card must pass."""

from __future__ import annotations

import copy
import re
import uuid
from functools import cache
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

ROOT = Path(__file__).resolve().parent.parent
US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ALLOWED_TOKEN = re.compile(r"\{\{context\.(patientId|userId|encounterId)\}\}")


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def patient(pid: str = "pt-1", race: str | None = None, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": pid, "birthDate": "1961-05-04", **extra}
    if race:
        resource["extension"] = [{"url": US_CORE_RACE, "extension": [
            {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": race}},
            {"url": "text", "valueString": race}]}]
    return resource


def troponin(oid: str = "trop-1", value: float = 212, high: float = 34,
             when: str = "2026-03-01T22:00:00Z") -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "89579-7"}]},
            "effectiveDateTime": when, "valueQuantity": {"value": value, "unit": "ng/L"},
            "referenceRange": [{"high": {"value": high, "unit": "ng/L"}}]}


@cache
def plan_keys(hook: str) -> dict[str, str]:
    """Prefetch keys the frozen test rules make the service ask for on `hook` (key -> template)."""
    from nudges.rules.compiler import load_ruleset
    from nudges.services import Services

    ruleset = load_ruleset(ROOT / "tests" / "rules").ruleset
    assert ruleset is not None
    return dict(Services.build(ruleset, frozenset({"active"})).for_hook(hook).plan.templates)


def full_prefetch(hook: str, *resources: dict[str, Any]) -> dict[str, Any]:
    """Everything the service asks for, as an EHR that prefetched it all would send it: each
    resource under the key of its type (a Patient as the resource itself), null where there is none."""
    prefetch: dict[str, Any] = {key: None for key in plan_keys(hook)}
    for resource in resources:
        kind = resource["resourceType"]
        if kind == "Patient":
            prefetch["patient"] = resource
            continue
        key = kind[0].lower() + kind[1:]
        if key not in prefetch:
            raise KeyError(f"no prefetch key for {kind} on {hook}: the rules do not read it ({sorted(prefetch)})")
        if prefetch[key] is None:
            prefetch[key] = bundle()
        prefetch[key]["entry"].append({"resource": resource})
    return prefetch


def patient_view(pid: str = "pt-1", *resources: dict[str, Any], prefetch: dict[str, Any] | None = None,
                 **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                            "context": {"userId": "Practitioner/dr-1", "patientId": pid}}
    if prefetch is None:
        prefetch = full_prefetch("patient-view", patient(pid), *resources)
    body["prefetch"] = prefetch
    body.update(extra)
    return body


def assert_no_empty(value: Any, path: str = "$") -> None:
    """CDS Hooks: no null, "", [] or {} anywhere in a response (cards: [] at the top is allowed)."""
    assert value is not None and value != "" and value != [] and value != {}, f"empty value at {path}"
    if isinstance(value, dict):
        for key, item in value.items():
            assert_no_empty(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_no_empty(item, f"{path}[{i}]")


def assert_valid_card(card: dict[str, Any]) -> None:
    assert_no_empty(card)
    uuid.UUID(card["uuid"])
    assert len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"]
    if "url" in card["source"]:
        assert card["source"]["url"].startswith(("http://", "https://"))
    if card.get("suggestions"):
        assert card["selectionBehavior"] in ("at-most-one", "any")
        for suggestion in card["suggestions"]:
            uuid.UUID(suggestion["uuid"])
            assert suggestion["label"]
            for action in suggestion.get("actions", []):
                assert action["type"] in ("create", "update", "delete")
                assert action["description"]
                if "resource" in action:
                    resource = copy.deepcopy(action["resource"])
                    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    for reason in card.get("overrideReasons", []):
        assert reason["system"] and reason["code"] and reason["display"]
    for link in card.get("links", []):
        assert link["url"].startswith(("http://", "https://")) and link["type"] in ("absolute", "smart")


def for_patient(resource: dict[str, Any], pid: str, key: str = "subject") -> dict[str, Any]:
    """A copy of `resource` that belongs to `pid` through `key` (subject, patient or beneficiary)."""
    return {**resource, key: {"reference": f"Patient/{pid}"}}


def cath_order(sid: str, pid: str, when: str = "2026-03-02T01:00:00Z") -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "id": sid, "status": "active", "intent": "order",
            "subject": {"reference": f"Patient/{pid}"}, "authoredOn": when,
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "41976001"}]}}


def coverage(cid: str, pid: str, payer_code: str = "2") -> dict[str, Any]:
    return {"resourceType": "Coverage", "id": cid, "status": "active", "beneficiary": {"reference": f"Patient/{pid}"},
            "payor": [{"display": "Payer"}], "type": {"coding": [
                {"system": "urn:oid:2.16.840.1.113883.3.221.5", "code": payer_code}]}}


def ndjson(*resources: dict[str, Any]) -> bytes:
    """FHIR Bulk Data format: one resource per line."""
    import orjson

    return b"".join(orjson.dumps(r) + b"\n" for r in resources)


def bulk_export(folder: Path, count: int) -> dict[str, list[dict[str, Any]]]:
    """A bulk export of `count` patients spread over several files in mixed order; returns the data
    per patient. Every third patient has a raised troponin 14 h ago; every sixth also a cath order."""
    folder.mkdir(parents=True, exist_ok=True)
    per_patient: dict[str, list[dict[str, Any]]] = {}
    patients, observations, orders, coverages = [], [], [], []
    for i in range(count):
        pid = f"bulk-{i:04d}"
        mine: list[dict[str, Any]] = []
        if i % 100 != 99:  # a few patients only appear through their references
            mine.append(patient(pid))
            patients.append(mine[-1])
        value = 212 if i % 3 == 0 else 12
        obs = for_patient(troponin(f"trop-{i}", value=value), pid)
        if i % 7 == 0:
            obs["subject"] = {"reference": f"https://ehr.example/fhir/Patient/{pid}"}
        observations.append(obs)
        mine.append(obs)
        if i % 6 == 0:
            orders.append(cath_order(f"cath-{i}", pid))
            mine.append(orders[-1])
        coverages.append(coverage(f"cov-{i}", pid, "2" if i % 2 else "5"))
        mine.append(coverages[-1])
        per_patient[pid] = mine
    observations.reverse()
    half = len(observations) // 2
    (folder / "Patient.ndjson").write_bytes(ndjson(*patients))
    (folder / "Observation.001.ndjson").write_bytes(ndjson(*observations[:half]) + b"\n")
    (folder / "Observation.002.ndjson").write_bytes(ndjson(*observations[half:]) + b"{not json\n")
    (folder / "ServiceRequest.ndjson").write_bytes(ndjson(*orders))
    (folder / "Coverage.ndjson").write_bytes(ndjson(*coverages))
    practitioners = [{"resourceType": "Practitioner", "id": f"dr-{n}"} for n in range(4)]
    (folder / "Practitioner.ndjson").write_bytes(ndjson(*practitioners))
    return per_patient


TROPONIN_RULE = "troponin-without-cath-plan"


def add_followup(rules_dir: Path, deliver: str = "", after: str = "12h") -> Path:
    """Give the frozen test troponin rule (in a per-test copy) a follow-up, with `deliver:` YAML items
    (each line indented under `deliver:`) when given. Returns the rule file."""
    path = rules_dir / "cardiology" / f"{TROPONIN_RULE}.yaml"
    text = path.read_text()
    assert "\nfollowup:" not in text
    block = f"followup:\n  start: troponin\n  after: {after}\n"
    if deliver:
        block += "  deliver:\n" + "".join(f"    {line}\n" for line in deliver.strip("\n").splitlines())
    path.write_text(text.rstrip("\n") + "\n" + block)
    return path


def backend_key(directory: Path, kid: str = "nudges-1") -> tuple[Path, dict[str, Any]]:
    """An RSA key for the service's SMART Backend Services client: the private PEM file, the public JWKS."""
    import json

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = directory / f"{kid}.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return path, {"keys": [{**public, "kid": kid, "alg": "RS384", "use": "sig"}]}


def wait_ready(base: str, process: Any, timeout: float = 60, also: Any = None) -> None:
    """Until a service started as a subprocess answers /readyz 200 (and `also()`, when given, holds);
    the process exiting or the deadline passing fails the test with what the process printed."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, f"{base} did not become ready within {timeout:g} s"
        try:
            if (also is None or also()) and httpx.get(f"{base}/readyz").status_code == 200:
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)

