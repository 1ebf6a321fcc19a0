"""Hook latency benchmark: the real service over loopback HTTP against a large synthetic patient.

Not a test (pytest does not collect it). It starts `nudges serve` as a subprocess on a free port with a
temporary SQLite database, the clock pinned (NUDGES_NOW) and hot reload off, waits for /readyz, and
calls the patient-view service with one pooled keep-alive httpx client, in blocks of back-to-back calls
(steady state, as the fhir.resources baseline is measured) alternating with blocks of in-process parses
of the same payloads, plus a series of calls each after 50 ms idle. It reports:

1. hook latency (median, p95) for a patient with 2,000 Observations, ~50 Conditions and ~50
   MedicationRequests, against the in-process `orjson.loads` time of the same body (target <= 2.0x);
2. the speed-up over validating every resource of that body with fhir.resources R4B (target >= 20x);
3. latency as the record grows: 50, 500, 2,000, 5,000 resources (target: linear);
4. latency as the rule set grows: 10, 50, 100, 200 extra active rules that do not match the patient
   (target: nearly flat);

plus the in-process cost of each stage (parse, pydantic request model, index, evaluate, cards, database)
so HTTP overhead can be separated from rule work.

    python benchmarks/hook_latency.py            # full run (about a minute on 2 cores)
    python benchmarks/hook_latency.py --quick    # smoke run (about 20 s)
    python benchmarks/hook_latency.py --json     # machine-readable output on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_RULES = ROOT / "rules"
NOW = "2026-03-02T12:00:00Z"
NOW_DT = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
SERVICE = "nudges-patient-view"
# Same-length placeholders, replaced per call so every call is a different patient and hook instance
# (suppression never changes the work) without re-serializing the body.
PID_PLACEHOLDER = "pt-bench-00000000"
INSTANCE_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"

# (LOINC code, display, short text, UCUM unit, reference low, reference high)
Analyte = tuple[str, str, str, str, float, float]
VITALS: list[Analyte] = [
    ("8867-4", "Heart rate", "Heart rate", "/min", 60, 100),
    ("9279-1", "Respiratory rate", "Respiratory rate", "/min", 12, 20),
    ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "SpO2", "%", 95, 100),
    ("8310-5", "Body temperature", "Temperature", "Cel", 36.1, 37.2),
    ("8480-6", "Systolic blood pressure", "Systolic BP", "mm[Hg]", 90, 130),
    ("8462-4", "Diastolic blood pressure", "Diastolic BP", "mm[Hg]", 60, 80),
    ("29463-7", "Body weight", "Weight", "kg", 50, 100),
    ("39156-5", "Body mass index (BMI) [Ratio]", "BMI", "kg/m2", 18.5, 25),
]
LABS: list[Analyte] = [
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "Glucose", "mg/dL", 70, 99),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "Sodium", "mmol/L", 135, 145),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "Potassium", "mmol/L", 3.5, 5.1),
    ("2075-0", "Chloride [Moles/volume] in Serum or Plasma", "Chloride", "mmol/L", 98, 107),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "Creatinine", "mg/dL", 0.7, 1.3),
    ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "BUN", "mg/dL", 7, 20),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "Hemoglobin", "g/dL", 13.5, 17.5),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "WBC", "10*3/uL", 4.5, 11),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "Platelets", "10*3/uL", 150, 400),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "HbA1c", "%", 4, 5.6),
    ("13457-7", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation", "LDL", "mg/dL", 0, 100),
    ("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "ALT", "U/L", 7, 56),
]
HS_TNI: Analyte = ("89579-7", "Troponin I.cardiac [Mass/volume] in Serum or Plasma by High sensitivity method",
                   "hs-Troponin I", "ng/L", 0, 34)
TNT: Analyte = ("6598-7", "Troponin T.cardiac [Mass/volume] in Serum or Plasma", "Troponin T", "ng/mL", 0, 0.01)
EGFR_2021: Analyte = ("98979-8", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, "
                      "Plasma or Blood by Creatinine-based formula (CKD-EPI 2021)", "eGFR (CKD-EPI 2021)",
                      "mL/min/{1.73_m2}", 60, 120)
EGFR_RACE: Analyte = ("48643-1", "Glomerular filtration rate/1.73 sq M.predicted among blacks [Volume Rate/Area] "
                      "in Serum, Plasma or Blood by Creatinine-based formula (MDRD)", "eGFR (MDRD, race-based)",
                      "mL/min/{1.73_m2}", 60, 120)
CONDITIONS = [
    ("38341003", "Hypertensive disorder, systemic arterial", "I10"),
    ("44054006", "Diabetes mellitus type 2", "E11.9"),
    ("55822004", "Hyperlipidemia", "E78.5"),
    ("431855005", "Chronic kidney disease stage 1", "N18.1"),
    ("195967001", "Asthma", "J45.909"),
    ("35489007", "Depressive disorder", "F32.A"),
    ("414545008", "Ischemic heart disease", "I25.9"),
    ("49436004", "Atrial fibrillation", "I48.91"),
    ("84114007", "Heart failure", "I50.9"),
    ("235595009", "Gastroesophageal reflux disease", "K21.9"),
]
MEDICATIONS = [
    ("197361", "amlodipine 5 MG Oral Tablet", "Take 1 tablet by mouth once daily"),
    ("860975", "metformin hydrochloride 500 MG Oral Tablet", "Take 1 tablet by mouth twice daily with meals"),
    ("617312", "atorvastatin 40 MG Oral Tablet", "Take 1 tablet by mouth at bedtime"),
    ("314076", "lisinopril 10 MG Oral Tablet", "Take 1 tablet by mouth once daily"),
    ("310965", "ibuprofen 200 MG Oral Tablet", "Take 1 tablet by mouth every 6 hours as needed for pain"),
    ("243670", "aspirin 81 MG Oral Tablet", "Take 1 tablet by mouth once daily"),
    ("855332", "warfarin sodium 5 MG Oral Tablet", "Take as directed by the anticoagulation clinic"),
    ("200031", "carvedilol 6.25 MG Oral Tablet", "Take 1 tablet by mouth twice daily"),
]


# --------------------------------------------------------------------------------------------------
# Synthetic patient


def _instant(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def observation(i: int, analyte: Analyte, when: datetime, value: float, lab: bool) -> dict[str, Any]:
    code, display, text, unit, low, high = analyte
    flag = "H" if value > high else "L" if value < low else "N"
    flag_display = {"H": "High", "L": "Low", "N": "Normal"}[flag]
    category = ("laboratory", "Laboratory") if lab else ("vital-signs", "Vital Signs")
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"obs-{i:05d}",
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": category[0], "display": category[1]}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": text},
        "subject": {"reference": f"Patient/{PID_PLACEHOLDER}"},
        "encounter": {"reference": f"Encounter/enc-{i // 12:04d}"},
        "effectiveDateTime": _instant(when),
        "issued": _instant(when + timedelta(hours=1)),
        "valueQuantity": _quantity(value, unit),
        "interpretation": [{"coding": [{"system": INTERPRETATION, "code": flag, "display": flag_display}]}],
        "referenceRange": [{"low": {"value": low, "unit": unit}, "high": {"value": high, "unit": unit}}],
    }
    if lab:
        resource["performer"] = [{"reference": "Organization/lab-1"}]
    return resource


def condition(i: int, rng: random.Random) -> dict[str, Any]:
    snomed, display, icd = CONDITIONS[i % len(CONDITIONS)]
    onset = NOW_DT - timedelta(days=rng.randint(30, 3650))
    return {
        "resourceType": "Condition",
        "id": f"cond-{i:04d}",
        "meta": {"lastUpdated": _instant(onset + timedelta(days=1))},
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active" if i % 5 else "resolved"}]},
        "verificationStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                  "code": "problem-list-item", "display": "Problem List Item"}]}],
        "code": {"coding": [{"system": SNOMED, "code": snomed, "display": display},
                            {"system": ICD10, "code": icd}], "text": display},
        "subject": {"reference": f"Patient/{PID_PLACEHOLDER}"},
        "onsetDateTime": _instant(onset),
        "recordedDate": _instant(onset + timedelta(days=1)),
        "recorder": {"reference": "Practitioner/dr-1", "display": "Dr. Example"},
    }


def medication_request(i: int, rng: random.Random) -> dict[str, Any]:
    rxnorm, display, sig = MEDICATIONS[i % len(MEDICATIONS)]
    authored = NOW_DT - timedelta(days=rng.randint(1, 1500))
    return {
        "resourceType": "MedicationRequest",
        "id": f"med-{i:04d}",
        "status": "active" if i % 3 else "completed",
        "intent": "order",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category", "code": "outpatient"}]}],
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": rxnorm, "display": display}],
                                      "text": display},
        "subject": {"reference": f"Patient/{PID_PLACEHOLDER}"},
        "authoredOn": _instant(authored),
        "requester": {"reference": "Practitioner/dr-1"},
        "dosageInstruction": [{"text": sig, "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                               "route": {"coding": [{"system": SNOMED, "code": "26643006", "display": "Oral"}]},
                               "doseAndRate": [{"doseQuantity": _quantity(1, "{tbl}")}]}],
    }


def patient_resource() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": PID_PLACEHOLDER,
        "meta": {"lastUpdated": "2026-01-15T09:00:00Z"},
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-0012345"}],
        "name": [{"use": "official", "family": "Bench", "given": ["Pat"]}],
        "gender": "female",
        "birthDate": "1961-05-04",
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en-US"}]},
                           "preferred": True}],
    }


def coverage_resource() -> dict[str, Any]:
    return {
        "resourceType": "Coverage",
        "id": "cov-1",
        "status": "active",
        "type": {"coding": [{"system": "urn:oid:2.16.840.1.113883.3.221.5", "code": "5",
                             "display": "PRIVATE HEALTH INSURANCE"}]},
        "subscriberId": "SUB-778899",
        "beneficiary": {"reference": f"Patient/{PID_PLACEHOLDER}"},
        "period": {"start": "2025-01-01"},
        "payor": [{"reference": "Organization/payer-1", "display": "Example Health Plan"}],
    }


def observations(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Vitals and labs over three years, a few troponins (one elevated 14 h ago, so the troponin rule
    fires and the card path and database write are exercised) and eGFRs (race-free and race-based
    within a year, so the eGFR rule runs its `any` and `none` clauses and stays quiet)."""
    troponins = max(1, min(8, count // 250))
    egfr_free = max(1, count // 200)
    egfr_race = max(1, count // 500) if count >= 50 else 0
    special: list[tuple[Analyte, datetime, float]] = [(HS_TNI, NOW_DT - timedelta(hours=14), 212.0)]
    for k in range(1, troponins):
        analyte = HS_TNI if k % 2 else TNT
        special.append((analyte, NOW_DT - timedelta(days=rng.randint(4, 900)), analyte[5] * 0.5))
    for k in range(egfr_free):
        days = 30 if k == 0 else rng.randint(1, 1000)
        special.append((EGFR_2021, NOW_DT - timedelta(days=days), round(rng.uniform(55, 95), 0)))
    for k in range(egfr_race):
        days = 60 if k == 0 else rng.randint(400, 1500)
        special.append((EGFR_RACE, NOW_DT - timedelta(days=days), round(rng.uniform(55, 95), 0)))
    special = special[:count]
    items: list[tuple[Analyte, datetime, float, bool]] = [(a, w, v, True) for a, w, v in special]
    for _ in range(count - len(special)):
        lab = rng.random() < 0.45
        analyte = rng.choice(LABS if lab else VITALS)
        low, high = analyte[4], analyte[5]
        spread = (high - low) or high or 1
        value = round(rng.gauss((low + high) / 2, spread / 3), 2)
        when = NOW_DT - timedelta(minutes=rng.randint(24 * 60, 3 * 365 * 24 * 60))
        items.append((analyte, when, value, lab))
    items.sort(key=lambda item: item[1], reverse=True)  # as a FHIR server answers with _sort=-date
    return [observation(i, a, w, v, lab) for i, (a, w, v, lab) in enumerate(items)]


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"fullUrl": f"urn:uuid:{uuid.UUID(int=i)}", "resource": r} for i, r in enumerate(resources)]}


def prefetch_key(resource_type: str) -> str:
    return resource_type[0].lower() + resource_type[1:]


@dataclass
class Body:
    template: bytes  # with the patient id and hook instance placeholders
    resources: int  # clinical resources (Observations + Conditions + MedicationRequests)
    resource_bytes: float  # mean serialized size of one clinical resource
    parsed: dict[str, Any]

    def instance(self, n: int) -> bytes:
        """The body for call n: its own patient id and hookInstance, same size and content otherwise."""
        pid = f"pt-bench-{n:08d}".encode()
        return self.template.replace(PID_PLACEHOLDER.encode(), pid).replace(
            INSTANCE_PLACEHOLDER.encode(), str(uuid.uuid4()).encode())


def build_body(keys: list[str], n_obs: int, n_cond: int, n_med: int, seed: int = 7) -> Body:
    """A patient-view request filling every prefetch key the service's discovery lists."""
    rng = random.Random(seed)
    obs = observations(n_obs, rng)
    conds = [condition(i, rng) for i in range(n_cond)]
    meds = [medication_request(i, rng) for i in range(n_med)]
    prefetch: dict[str, Any] = {}
    for key in keys:
        prefetch[key] = patient_resource() if key == "patient" else searchset([])
    bundles = [k for k in keys if k != "patient"]
    fallback = "observation" if "observation" in bundles else (bundles[0] if bundles else "observation")
    by_key: dict[str, list[dict[str, Any]]] = {}
    for kind, items in (("Observation", obs), ("Condition", conds), ("MedicationRequest", meds),
                        ("Coverage", [coverage_resource()])):
        key = prefetch_key(kind)
        by_key.setdefault(key if key in bundles else fallback, []).extend(items)
    for key, items in by_key.items():
        prefetch[key] = searchset(items)
    body = {"hook": "patient-view", "hookInstance": INSTANCE_PLACEHOLDER,
            "context": {"userId": "Practitioner/dr-1", "patientId": PID_PLACEHOLDER}, "prefetch": prefetch}
    clinical = obs + conds + meds
    size = statistics.fmean(len(orjson.dumps(r)) for r in clinical) if clinical else 0.0
    return Body(orjson.dumps(body), len(clinical), size, body)


def split(total: int) -> tuple[int, int, int]:
    """Observations, Conditions, MedicationRequests for a record of `total` clinical resources."""
    side = max(1, round(total * 0.025))
    return total - 2 * side, side, side


def all_resources(parsed: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for value in parsed["prefetch"].values():
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            found += [e["resource"] for e in value.get("entry", [])]
        elif isinstance(value, dict):
            found.append(value)
    return found


# --------------------------------------------------------------------------------------------------
# Synthetic rules


def synthetic_rule_files(i: int) -> dict[str, str]:
    """One active rule that never matches the benchmark patient, its value set (a code the patient
    does not have) and the minimal cases file lint demands (one firing, one non-firing case)."""
    rule_id = f"bench-synthetic-{i:03d}"
    kind, system, date_field, where = [
        ("Observation", LOINC, "effectiveDateTime", "status = 'final'"),
        ("Condition", SNOMED, "onsetDateTime", "clinicalStatus.coding.where(code = 'active').exists()"),
        ("MedicationRequest", RXNORM, "authoredOn", "status = 'active'"),
    ][i % 3]
    code, other = f"BENCH-{i:03d}", f"BENCH-OTHER-{i:03d}"
    element = "medicationCodeableConcept" if kind == "MedicationRequest" else "code"

    def resource(with_code: str) -> str:
        data: dict[str, Any] = {"resourceType": kind, "id": f"{kind.lower()}-1",
                                element: {"coding": [{"system": system, "code": with_code}]},
                                date_field: "2026-02-01T09:00:00Z"}
        if kind != "Observation":  # required in R4 (lint validates case resources)
            data["subject"] = {"reference": "Patient/case-patient"}
        if kind == "Observation":
            data["status"] = "final"
        elif kind == "Condition":
            data["clinicalStatus"] = {"coding": [{"code": "active"}]}
        else:
            data.update(status="active", intent="order")
        return orjson.dumps(data).decode()

    rule = f"""id: {rule_id}
title: Synthetic benchmark rule {i:03d} (never matches the benchmark patient)
status: active
version: 1.0.0
hooks: [patient-view]
topic: care-navigation
owner: benchmarks
when:
  all:
    - as: hit
      resource: {kind}
      codes: {rule_id}
      within: 1y
      where: "{where}"
card:
  summary: "Synthetic benchmark rule {i:03d} matched {{{{hit.display}}}}"
  indicator: info
rationale: Generated by benchmarks/hook_latency.py to measure how latency grows with the rule count.
citations:
  - title: Synthetic benchmark rule
    url: https://example.org/nudges/benchmarks
falsepositives:
  - Synthetic; never served outside the benchmark.
"""
    cases = f"""rule: {rule_id}
now: "{NOW}"
cases:
  - name: synthetic code present
    hook: patient-view
    resources:
      - {resource(code)}
    expect:
      - indicator: info
  - name: near miss - another code
    hook: patient-view
    resources:
      - {resource(other)}
    expect: []
"""
    valueset = f"""name: {rule_id}
title: Synthetic benchmark code {i:03d}
codes:
  - {{system: "{system}", code: "{code}", display: "Synthetic benchmark code {i:03d}"}}
"""
    return {f"bench/{rule_id}.yaml": rule, f"bench/{rule_id}.cases.yaml": cases,
            f"valuesets/{rule_id}.yaml": valueset}


def make_rules_dir(base: Path, extra: int, source: Path = BUNDLED_RULES) -> Path:
    """A copy of the base rules plus `extra` synthetic active rules (the seeds and fixtures folders copied
    beside it, as lint resolves citations and cases' bundles there)."""
    target = base / "rules"
    shutil.copytree(source, target)
    for folder in ("seeds", "fhir_fixtures"):
        if (source.resolve().parent / folder).is_dir():
            shutil.copytree(source.resolve().parent / folder, base / folder)
    for i in range(extra):
        for relative, text in synthetic_rule_files(i).items():
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return target


# --------------------------------------------------------------------------------------------------
# The service under test


def nudges_command() -> list[str]:
    script = Path(sys.executable).parent / "nudges"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nudges.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lint_all(directories: list[Path]) -> list[str]:
    """`nudges lint` on each directory (in parallel); any problem stops the benchmark."""
    running = [(d, subprocess.Popen([*nudges_command(), "lint", str(d)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)) for d in directories]
    lines = []
    for directory, process in running:
        output, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"nudges lint {directory} failed:\n{output[-4000:]}")
        lines.append(output.strip().splitlines()[-1])
    return lines


class Server:
    """`nudges serve` in a subprocess, and one keep-alive httpx client bound to it."""

    def __init__(self, rules: Path, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = workdir / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUDGES_")}
        env.update(NUDGES_NOW=NOW, NUDGES_RELOAD_INTERVAL_SECONDS="0", NUDGES_LOG_LEVEL="WARNING")
        command = [*nudges_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--database-url", f"sqlite:///{workdir / 'bench.db'}", "--rules", str(rules)]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120,
                                   limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        self.ready: dict[str, Any] = {}
        self.keys: list[str] = []
        self.body: Body | None = None

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the service exited with {self.process.returncode}:\n"
                                 f"{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the service was not ready within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")
            try:
                response = self.client.get("/readyz")
                if response.status_code == 200:
                    self.ready = response.json()
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        response = self.client.get("/cds-services")
        response.raise_for_status()
        services = {s["id"]: s for s in response.json()["services"]}
        self.keys = list(services[SERVICE]["prefetch"])

    def call(self, body: bytes) -> tuple[float, dict[str, Any]]:
        """One timed call. This process holds every generated body (a large heap), so its own collector
        is paused for the call: its pauses are the client's, not the service's latency."""
        gc.disable()
        try:
            start = time.perf_counter()
            response = self.client.post(f"/cds-services/{SERVICE}", content=body,
                                        headers={"Content-Type": "application/json"})
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        if response.status_code != 200:
            raise SystemExit(f"hook call failed: HTTP {response.status_code}: {response.text[:500]}")
        return elapsed, response.json()

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def serving(*specs: tuple[Path, Path]) -> Iterator[list[Server]]:
    """Start one server per (rules, workdir) at once, wait until all are ready, stop them all after."""
    servers: list[Server] = []
    try:
        for rules, workdir in specs:
            servers.append(Server(rules, workdir))
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


# --------------------------------------------------------------------------------------------------
# Measurement


def ms(seconds: float) -> float:
    return seconds * 1000.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median_ms": ms(statistics.median(values)), "p95_ms": ms(percentile(values, 95)),
            "min_ms": ms(min(values)), "max_ms": ms(max(values))}


def timed_loads(payload: bytes, *, gc_enabled: bool = True) -> float:
    """One in-process orjson.loads of the body; with gc_enabled=False the collector is paused around it
    (the pure parse cost, without the collections that allocating ~100k containers triggers)."""
    if not gc_enabled:
        gc.disable()
    try:
        start = time.perf_counter()
        orjson.loads(payload)
        return time.perf_counter() - start
    finally:
        if not gc_enabled:
            gc.enable()


class Numbers:
    """Patient numbers are never reused, so no call is suppressed by an earlier one."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n


@dataclass
class Series:
    """Samples for one (server, body): HTTP latency and in-process loads of the same payloads."""

    server: Server
    body: Body
    http: list[float]
    loads: list[float]
    loads_nogc: list[float]
    cards: set[int]

    @classmethod
    def of(cls, server: Server, body: Body) -> Series:
        return cls(server, body, [], [], [], set())

    def block(self, numbers: Numbers, size: int, *, record: bool = True, loads: bool = True) -> None:
        """`size` calls back to back (a closed loop, as a load generator drives a service), then `size`
        in-process loads of the same payloads, so both are measured in steady state."""
        payloads = []
        for _ in range(size):
            # Made just before its call (outside the timed region), as a client serializes a request just
            # before sending it: a body built long before is cold in the client's caches (+1.5 ms here).
            payload = self.body.instance(numbers.next())
            payloads.append(payload)
            elapsed, answer = self.server.call(payload)
            self.cards.add(len(answer["cards"]))
            if record:
                self.http.append(elapsed)
        if record and loads:
            self.loads.extend(timed_loads(payload) for payload in payloads)
            self.loads_nogc.extend(timed_loads(payload, gc_enabled=False) for payload in payloads)

    def after_idle(self, numbers: Numbers, calls: int, idle: float) -> list[float]:
        """Calls each preceded by `idle` seconds of nothing: what a lightly used service sees, every call
        starting with cold caches and sleeping CPUs (slower on this VM by a third or more)."""
        times = []
        for _ in range(calls):
            payload = self.body.instance(numbers.next())
            time.sleep(idle)
            elapsed, _ = self.server.call(payload)
            times.append(elapsed)
        return times


BLOCK = 10  # calls per back-to-back block


def interleave(series: list[Series], calls: int, warmup: int, numbers: Numbers, *, loads: bool = True,
               seed: int = 11) -> None:
    """Blocks of back-to-back calls, round-robin over the series in a shuffled order each round, so load
    on the machine that drifts during the run hits every series alike."""
    rng = random.Random(seed)
    size = max(1, min(BLOCK, calls))
    for item in series:
        item.block(numbers, max(1, warmup), record=False)
    for _ in range(math.ceil(calls / size)):
        order = list(series)
        rng.shuffle(order)
        for item in order:
            item.block(numbers, size, loads=loads)


def measure_fhir_resources(body: Body, runs: int) -> dict[str, Any]:
    from fhir.resources.R4B import get_fhir_model_class

    resources = all_resources(body.parsed)
    classes = {r["resourceType"]: get_fhir_model_class(r["resourceType"]) for r in resources}
    for resource in {r["resourceType"]: r for r in resources}.values():  # import and build validators once
        classes[resource["resourceType"]].model_validate(resource)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for resource in resources:
            classes[resource["resourceType"]].model_validate(resource)
        times.append(time.perf_counter() - start)
    return {"resources": len(resources), "runs": runs, "median_ms": ms(statistics.median(times)),
            "min_ms": ms(min(times))}


class GcClock:
    """Time spent in the cyclic garbage collector (all generations) while active, via gc.callbacks."""

    def __init__(self) -> None:
        self.total = 0.0
        self.collections = [0, 0, 0]
        self.active = False
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if not self.active:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1


STAGES = ("orjson_loads", "parse_call", "build_record", "engine_evaluate", "runtime_evaluate", "db_cards",
          "runtime_rest", "engine_only", "pipeline")


class Timed:
    """Wraps one method of one object (an instance attribute, nothing else patched) to time its calls."""

    def __init__(self, owner: Any, name: str) -> None:
        self.inner = getattr(owner, name)
        self.last = 0.0
        setattr(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.last += time.perf_counter() - start


def measure_in_process(rules: Path, body: Body, runs: int, workdir: Path, *, light: bool = False) -> dict[str, Any]:
    """The service's own pipeline without HTTP, on a fresh body each run.

    Pass A pauses the garbage collector inside each run and times every stage on its own: what the event
    loop does (orjson.loads, pipeline.parse_call), the index and the rules alone, then what the worker thread
    does (Runtime.evaluate: index, rules, cards, the suppression claim and card write in one transaction, and
    whatever else it runs).
    Pass B runs loads + parse_call + Runtime.evaluate with the collector as the service has it (heap
    settled after the rule load, collection paused per request) and counts the GC pauses that still fall
    inside. `light` stops after the index and the rules (pass A only)."""
    from nudges import engine, pipeline
    from nudges.api.auth import Caller
    from nudges.heap import settle_heap
    from nudges.runtime import Runtime
    from nudges.settings import Settings

    workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(rules=rules, database_url=f"sqlite:///{workdir / 'inprocess.db'}", now=NOW,
                        reload_interval_seconds=0)
    runtime = Runtime.create(settings)
    runtime.store.migrate()
    if not runtime.reloader.reload():
        raise SystemExit("\n".join(str(p) for p in runtime.reloader.last_problems))
    services, caller = runtime.services(), Caller(authenticated=False)
    now = runtime.clock.now()
    db_cards = Timed(runtime.store, "show_cards")
    samples: dict[str, list[float]] = {name: [] for name in STAGES}
    with_gc: list[float] = []
    gc_clock = GcClock()
    numbers = Numbers()
    try:
        for i in range(runs + 3):  # pass A: stage by stage, collector paused
            payload = body.instance(numbers.next())
            db_cards.last = 0.0
            gc.disable()
            try:
                t0 = time.perf_counter()
                data = orjson.loads(payload)
                t1 = time.perf_counter()
                call = pipeline.parse_call(services, SERVICE, data)
                t2 = time.perf_counter()
                record = pipeline.build_record(call, call.service.index)
                t3 = time.perf_counter()
                engine.evaluate(call.service.rules, record, now)
                t4 = time.perf_counter()
                if not light:
                    runtime.evaluate(call, caller)  # the worker thread's whole job, as the service runs it
                t5 = time.perf_counter()
            finally:
                gc.enable()
            del data, call, record
            if i < 3:  # warm-up
                continue
            stages = [("orjson_loads", t1 - t0), ("parse_call", t2 - t1), ("build_record", t3 - t2),
                      ("engine_evaluate", t4 - t3), ("engine_only", t4 - t0)]
            if not light:
                rest = (t5 - t4) - (t3 - t2) - (t4 - t3) - db_cards.last
                stages += [("runtime_evaluate", t5 - t4), ("db_cards", db_cards.last), ("runtime_rest", rest),
                           ("pipeline", (t2 - t0) + (t5 - t4))]
            for name, value in stages:
                samples[name].append(value)
        gc.callbacks.append(gc_clock)
        settle_heap()  # as the service does after a rule load
        for i in range(0 if light else runs + 3):  # pass B: the pipeline with the collector as the service has it
            payload = body.instance(numbers.next())
            if i == 3:
                gc_clock.total, gc_clock.collections = 0.0, [0, 0, 0]
            gc_clock.active = True
            with runtime.quiet:  # the service pauses collection per request and frees the body after answering
                t0 = time.perf_counter()
                data = orjson.loads(payload)
                runtime.evaluate(pipeline.parse_call(services, SERVICE, data), caller)
                t1 = time.perf_counter()
                del data
            gc_clock.active = False
            if i >= 3:
                with_gc.append(t1 - t0)
    finally:
        if gc_clock in gc.callbacks:
            gc.callbacks.remove(gc_clock)
        runtime.store.dispose()
        asyncio.run(runtime.fhir.close())
    result: dict[str, Any] = {
        "rules": len(services.by_id[SERVICE].rules), "runs": runs, "tracked_objects": len(gc.get_objects()),
        "stages_median_ms": {k: ms(statistics.median(v)) for k, v in samples.items() if v},
        "stages_min_ms": {k: ms(min(v)) for k, v in samples.items() if v}}
    if with_gc:
        result.update({"pipeline_with_gc": summary(with_gc) | {"mean_ms": ms(statistics.fmean(with_gc))},
                       "gc_ms_per_call": ms(gc_clock.total / runs),
                       "gc_full_collections_per_call": gc_clock.collections[2] / runs,
                       "gc_collections_per_call": [n / runs for n in gc_clock.collections]})
    return result


# --------------------------------------------------------------------------------------------------
# Report


def fit_line(xs: list[float], ys: list[float]) -> dict[str, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"fixed_ms": intercept, "us_per_resource": slope * 1000, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report_text(r: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    cfg, body, main = r["config"], r["body"], r["main"]
    lat, loads, nogc = main["latency"], main["orjson_loads"], main["orjson_loads_gc_paused"]
    add(f"nudges hook latency benchmark: {'quick' if cfg['quick'] else 'full'} run, {cfg['cpus']} CPUs, "
        f"Python {cfg['python']}, code {cfg['code']}")
    add(f"load average {cfg['load_before']} at start, {cfg['load_after']} at end; NUDGES_NOW={NOW}")
    add(f"service: {cfg['command']} serve (uvicorn, SQLite); loopback HTTP, one keep-alive httpx client; "
        f"blocks of {BLOCK} back-to-back calls alternating with blocks of in-process orjson.loads of the same payloads")
    add("")
    add(f"1. Large patient: {body['observations']} Observations + {body['conditions']} Conditions + "
        f"{body['medication_requests']} MedicationRequests (+ Patient, Coverage)")
    add(f"   body {body['bytes'] / 1e6:.2f} MB, mean clinical resource {body['mean_resource_bytes']:.0f} bytes; "
        f"prefetch keys: {', '.join(body['prefetch_keys'])}")
    add(f"   rules: {main['lint']}; {main['service_rules']} on patient-view; cards per call: {lat['cards_per_call']}")
    add(f"   {'':32}{'median':>9}  {'p95':>9}  {'min':>9}")
    add(f"   {'hook latency (HTTP)':<32}{lat['median_ms']:>9.2f}  {lat['p95_ms']:>9.2f}  {lat['min_ms']:>9.2f} ms  "
        f"({lat['n']} calls after {cfg['warmup']} warm-up)")
    add(f"   {'orjson.loads, in-process':<32}{loads['median_ms']:>9.2f}  {loads['p95_ms']:>9.2f}  "
        f"{loads['min_ms']:>9.2f} ms  ({loads['n']} runs)")
    add(f"   {'orjson.loads, GC paused':<32}{nogc['median_ms']:>9.2f}  {nogc['p95_ms']:>9.2f}  "
        f"{nogc['min_ms']:>9.2f} ms  (pure parse)")
    idle = main["after_idle"]
    add(f"   {'hook latency after 50 ms idle':<32}{idle['median_ms']:>9.2f}  {idle['p95_ms']:>9.2f}  "
        f"{idle['min_ms']:>9.2f} ms  ({idle['n']} calls, each after a pause: cold caches)")
    add(f"   latency / orjson.loads = {main['ratio']:.2f}x   target <= 2.0x   {verdict(main['ratio'] <= 2.0)}")
    add(f"   (latency / GC-paused loads = {main['ratio_gc_paused']:.2f}x; min / min = {main['ratio_min']:.2f}x)")
    add("")
    fr = r["fhir_resources"]
    add(f"2. fhir.resources R4B: model_validate of all {fr['resources']} resources of that body takes "
        f"{fr['median_ms']:.1f} ms (median of {fr['runs']})")
    add(f"   speed-up = {fr['median_ms']:.1f} / {lat['median_ms']:.2f} ms = {fr['speedup']:.1f}x   target >= 20x   "
        f"{verdict(fr['speedup'] >= 20)}")
    add(f"   (both in steady state; against the latency after idle: {fr['speedup_after_idle']:.1f}x)")
    add("")
    add(f"3. Scaling in resources (same server, sizes interleaved, {cfg['scaling_calls']} calls each)")
    add(f"   {'resources':>9}  {'body MB':>7}  {'median ms':>9}  {'p95 ms':>8}  {'min ms':>8}  {'us/resource':>11}  "
        f"{'loads ms':>8}  {'ratio':>6}  {'parse ms':>8}  {'beyond parse':>12}")
    for row in r["scaling_resources"]:
        add(f"   {row['resources']:>9}  {row['bytes'] / 1e6:>7.2f}  {row['median_ms']:>9.2f}  {row['p95_ms']:>8.2f}  "
            f"{row['min_ms']:>8.2f}  {row['us_per_resource']:>11.1f}  {row['loads_median_ms']:>8.2f}  "
            f"{row['ratio']:>6.2f}  {row['parse_ms']:>8.2f}  {row['median_ms'] - row['parse_ms']:>9.2f} ms")
    fit, own = r["scaling_resources_fit"], r["scaling_resources_fit_beyond_parse"]
    add(f"   least-squares fit of the medians: {fit['fixed_ms']:.2f} ms + {fit['us_per_resource']:.1f} us per "
        f"resource (R^2 {fit['r2']:.4f}): {'linear' if fit['r2'] >= 0.98 else 'NOT linear'} (R^2 >= 0.98)")
    add(f"   the same beyond the GC-paused parse (the service's own work): {own['fixed_ms']:.2f} ms + "
        f"{own['us_per_resource']:.1f} us per resource (R^2 {own['r2']:.4f}): "
        f"{'linear' if own['r2'] >= 0.98 else 'NOT linear'}")
    add("   (orjson.loads itself costs more per resource as bodies outgrow the CPU caches: "
        + " -> ".join(f"{row['parse_ms'] * 1000 / row['resources']:.1f}" for row in r["scaling_resources"])
        + " us per resource)")
    add("")
    add(f"4. Scaling in rules ({body['observations']}-Observation patient; extra active rules that do not match; "
        f"servers interleaved, {cfg['rule_calls']} calls each)")
    add(f"   {'extra':>5}  {'patient-view':>12}  {'median ms':>9}  {'p95 ms':>8}  {'min ms':>8}  {'vs +0':>6}  "
        f"{'engine-only ms':>14}  {'rules ms':>8}  lint")
    for row in r["scaling_rules"]:
        engine_ms = f"{row['engine_only_ms']:>14.2f}" if row["engine_only_ms"] is not None else f"{'-':>14}"
        rules_ms = f"{row['rules_only_ms']:>8.2f}" if row["rules_only_ms"] is not None else f"{'-':>8}"
        add(f"   {row['extra_rules']:>5}  {row['service_rules']:>12}  {row['median_ms']:>9.2f}  {row['p95_ms']:>8.2f}  "
            f"{row['min_ms']:>8.2f}  {row['vs_base']:>5.2f}x  {engine_ms}  {rules_ms}  {row['lint']}")
    if any(row["engine_only_ms"] is not None for row in r["scaling_rules"]):
        add("   (engine-only and rules: in-process with the collector paused, as in section 5)")
    worst = max((row["vs_base"] for row in r["scaling_rules"]), default=1.0)
    add(f"   worst: {worst:.2f}x the latency with no extra rules: {'nearly flat' if worst <= 1.25 else 'NOT flat'} "
        "(<= 1.25x)")
    add("")
    ip = r["in_process"]
    med, low, wgc = ip["stages_median_ms"], ip["stages_min_ms"], ip["pipeline_with_gc"]
    add(f"5. Where the time goes: the same pipeline in-process, same body, {ip['runs']} runs "
        f"({ip['tracked_objects']:,} GC-tracked objects in this process)")
    add(f"   stage costs with the garbage collector paused {'':3}{'median':>9}  {'min':>9}")
    for name, label in (("orjson_loads", "event loop: orjson.loads"),
                        ("parse_call", "event loop: pipeline.parse_call (pydantic model)"),
                        ("runtime_evaluate", "worker thread: Runtime.evaluate, made of"),
                        ("build_record", "  pipeline.build_record (index)"),
                        ("engine_evaluate", "  engine.evaluate (rules)"),
                        ("db_cards", "  DB suppression claim + card write"),
                        ("runtime_rest", "  the rest (cards, follow-ups; a difference)"),
                        ("engine_only", "engine-only: loads + parse_call + index + rules"),
                        ("pipeline", "pipeline: loads + parse_call + Runtime.evaluate")):
        lowest = "n/a" if name == "runtime_rest" else f"{low[name]:.2f}"  # min of a difference means nothing
        add(f"   {label:<50}{med[name]:>9.2f}  {lowest:>9} ms")
    add(f"   the same pipeline with the collector as the service runs it: median {wgc['median_ms']:.2f} ms, "
        f"mean {wgc['mean_ms']:.2f} ms, "
        f"p95 {wgc['p95_ms']:.2f} ms;")
    add(f"     GC pauses {ip['gc_ms_per_call']:.2f} ms per call on average, collections per call "
        f"(gen0/gen1/gen2) {'/'.join(f'{n:.2f}' for n in ip['gc_collections_per_call'])}")
    add(f"   HTTP + uvicorn + FastAPI + thread hop (HTTP median - pipeline-with-GC median): "
        f"{ip['http_overhead_ms']:.2f} ms; min - min: {ip['http_overhead_min_ms']:.2f} ms")
    return "\n".join(lines)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def code_version() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    calls, warmup = (25, 3) if quick else (200, 20)
    scale_calls = 8 if quick else 30
    rule_calls = 8 if quick else 30
    fhir_runs = 1 if quick else 3
    engine_runs = 8 if quick else 60
    sizes = [50, 500, 2000, 5000]
    extra_rules = [0, 10, 200] if quick else [0, 10, 50, 100, 200]
    numbers = Numbers()
    results: dict[str, Any] = {"config": {
        "quick": quick, "cpus": os.cpu_count(), "python": sys.version.split()[0], "now": NOW, "code": code_version(),
        "load_before": load_average(), "rules_base": str(args.rules), "command": " ".join(nudges_command()),
        "calls": calls, "warmup": warmup, "scaling_calls": scale_calls, "rule_calls": rule_calls,
        "fhir_runs": fhir_runs, "engine_runs": engine_runs}}
    with tempfile.TemporaryDirectory(prefix="nudges-bench-") as tmp_name:
        tmp = Path(tmp_name)
        progress(f"generating rule directories ({args.rules} + {extra_rules} synthetic rules) and linting them")
        rule_dirs = {extra: make_rules_dir(tmp / f"rules-{extra}", extra, args.rules) for extra in extra_rules}
        lint_lines = dict(zip(extra_rules, lint_all(list(rule_dirs.values())), strict=True))

        progress("starting the service with the base rules")
        with serving((rule_dirs[0], tmp / "serve-main")) as (server,):
            body = build_body(server.keys, 2000, 50, 50)
            results["body"] = {"observations": 2000, "conditions": 50, "medication_requests": 50,
                               "bytes": len(body.template), "mean_resource_bytes": body.resource_bytes,
                               "prefetch_keys": server.keys}
            progress(f"1. {calls} calls with a {len(body.template) / 1e6:.2f} MB body")
            main = Series.of(server, body)
            interleave([main], calls, warmup, numbers)
            latency = summary(main.http) | {"cards_per_call": sorted(main.cards)}
            loads, nogc = summary(main.loads), summary(main.loads_nogc)
            idle_calls = 10 if quick else 40
            progress(f"1b. {idle_calls} calls after 50 ms idle")
            after_idle = summary(main.after_idle(numbers, idle_calls, 0.05))
            results["main"] = {
                "lint": lint_lines[0], "rule_count": server.ready.get("rule_count"), "latency": latency,
                "orjson_loads": loads, "orjson_loads_gc_paused": nogc,
                "ratio": latency["median_ms"] / loads["median_ms"],
                "ratio_gc_paused": latency["median_ms"] / nogc["median_ms"],
                "ratio_min": latency["min_ms"] / loads["min_ms"], "after_idle": after_idle}

            progress(f"3. scaling in resources: {sizes}")
            series = [Series.of(server, build_body(server.keys, *split(size))) for size in sizes]
            interleave(series, scale_calls, max(2, warmup // 5), numbers)
            rows = []
            for item in series:
                lat = summary(item.http)
                rows.append({"resources": item.body.resources, "bytes": len(item.body.template),
                             "median_ms": lat["median_ms"], "p95_ms": lat["p95_ms"], "min_ms": lat["min_ms"],
                             "us_per_resource": lat["median_ms"] * 1000 / item.body.resources,
                             "loads_median_ms": ms(statistics.median(item.loads)),
                             "parse_ms": ms(statistics.median(item.loads_nogc)),
                             "ratio": lat["median_ms"] / ms(statistics.median(item.loads)),
                             "cards_per_call": sorted(item.cards)})
            results["scaling_resources"] = rows
            results["scaling_resources_fit"] = fit_line([float(r["resources"]) for r in rows],
                                                        [r["median_ms"] for r in rows])
            results["scaling_resources_fit_beyond_parse"] = fit_line(
                [float(r["resources"]) for r in rows], [r["median_ms"] - r["parse_ms"] for r in rows])

        progress(f"2. fhir.resources validation of the same body ({fhir_runs} run(s))")
        fhir = measure_fhir_resources(body, fhir_runs)
        fhir["speedup"] = fhir["median_ms"] / latency["median_ms"]
        fhir["speedup_after_idle"] = fhir["median_ms"] / results["main"]["after_idle"]["median_ms"]
        results["fhir_resources"] = fhir

        progress(f"5. in-process stages ({engine_runs} runs)")
        in_process = measure_in_process(rule_dirs[0], body, engine_runs, tmp / "in-process")
        in_process["http_overhead_ms"] = latency["median_ms"] - in_process["pipeline_with_gc"]["median_ms"]
        in_process["http_overhead_min_ms"] = latency["min_ms"] - in_process["pipeline_with_gc"]["min_ms"]
        results["in_process"] = in_process
        results["main"]["service_rules"] = in_process["rules"]

        progress(f"4. scaling in rules: {len(extra_rules)} servers, {rule_calls} interleaved calls each")
        with serving(*((rule_dirs[extra], tmp / f"serve-{extra}") for extra in extra_rules)) as servers:
            series = [Series.of(s, build_body(s.keys, 2000, 50, 50)) for s in servers]
            interleave(series, rule_calls, max(2, warmup // 5), numbers, loads=False)
        rows = []
        for extra, item in zip(extra_rules, series, strict=True):
            engine_only = rules_only = None
            if not quick:
                measured = measure_in_process(rule_dirs[extra], item.body, max(10, engine_runs // 4),
                                              tmp / f"in-process-{extra}", light=True)
                engine_only = measured["stages_median_ms"]["engine_only"]
                rules_only = measured["stages_median_ms"]["engine_evaluate"]
            lat = summary(item.http)
            rows.append({"extra_rules": extra, "rule_count": item.server.ready.get("rule_count"),
                         "service_rules": in_process["rules"] + extra,  # every synthetic rule is patient-view
                         "median_ms": lat["median_ms"], "p95_ms": lat["p95_ms"], "min_ms": lat["min_ms"],
                         "engine_only_ms": engine_only, "rules_only_ms": rules_only,
                         "lint": lint_lines[extra].split(",")[0],
                         "prefetch_keys": item.server.keys, "cards_per_call": sorted(item.cards)})
        base = rows[0]["median_ms"]
        for row in rows:
            row["vs_base"] = row["median_ms"] / base
        results["scaling_rules"] = rows
    results["config"]["load_after"] = load_average()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Hook latency benchmark of the nudges CDS Hooks service.")
    parser.add_argument("--quick", action="store_true", help="fewer iterations: a smoke run of about 20 s")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    parser.add_argument("--rules", type=Path, default=BUNDLED_RULES,
                        help="base rules directory copied for every run (default: the bundled rules/)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(args)
    results["config"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(report_text(results))
        print(f"\n(total wall time {results['config']['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
