"""What the benchmark scripts share: the synthetic patient, the service under test and the statistics.

hook_latency.py and hook_load.py measure the same service with the same kind of request; keeping the body
generator, the server launcher and the percentile in one place means a figure in one report can be set
beside a figure in the other without wondering whether the patient, the clock or the percentile differ.
Imported as a sibling module (the scripts run as `python benchmarks/<script>.py`, so benchmarks/ is on the
path); not a test, and not part of the nudges package.
"""

from __future__ import annotations

import gc
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
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
        """The body for call n: its own patient id and hookInstance, same size and content otherwise (the
        instance derived from n, so a rerun sends the very same bytes)."""
        pid = f"pt-bench-{n:08d}".encode()
        return self.template.replace(PID_PLACEHOLDER.encode(), pid).replace(
            INSTANCE_PLACEHOLDER.encode(), str(uuid.UUID(int=n, version=4)).encode())


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
# CPU time from /proc

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat(pid: int | str) -> tuple[int, str, float] | None:
    """(parent pid, command name, CPU seconds) of a process from /proc/PID/stat, None once it is gone. The
    CPU is every thread's and that of children it has reaped (utime, stime, cutime, cstime)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
    except OSError:
        return None
    name = raw[raw.index("(") + 1:raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2:].split()
    return int(rest[1]), name, sum(int(v) for v in rest[11:15]) / CLK_TCK


# --------------------------------------------------------------------------------------------------
# The service under test


def nudges_command() -> list[str]:
    script = Path(sys.executable).parent / "nudges"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nudges.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Endpoint:
    """A service in a subprocess on a free loopback port, and one keep-alive httpx client bound to it.

    nudges and any peer it is compared with are driven through this one class, so the client's share of a
    measured call (serializing, the socket, reading the answer) is the same on both sides of a ratio."""

    hook_path = ""  # where hook calls are posted

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=120,
                                   limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))

    def launch(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.command = command
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_for(self, path: str, timeout: float = 120) -> httpx.Response:
        """Poll `path` until it answers 200; the process dying or the deadline passing stops the benchmark
        with the end of the server's log, which is where the reason is."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.command[0]} exited with {self.process.returncode}:\n"
                                 f"{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.url} was not ready within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")
            try:
                response = self.client.get(path)
                if response.status_code == 200:
                    return response
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def call(self, body: bytes) -> tuple[float, dict[str, Any]]:
        """One timed call. This process holds every generated body (a large heap), so its own collector
        is paused for the call: its pauses are the client's, not the service's latency."""
        gc.disable()
        try:
            start = time.perf_counter()
            response = self.client.post(self.hook_path, content=body, headers={"Content-Type": "application/json"})
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        if response.status_code != 200:
            raise SystemExit(f"hook call to {self.url}{self.hook_path} failed: HTTP {response.status_code}: "
                             f"{response.text[:500]}")
        return elapsed, response.json()

    def cpu_seconds(self) -> float:
        """CPU the service's process has used so far, summed over its live threads: nanoseconds on CPU
        from /proc/PID/task/*/schedstat (/proc/PID/stat counts in 10 ms ticks, too coarse for a few
        hundred calls of a millisecond)."""
        assert self.process is not None
        total = 0
        try:
            tasks = os.listdir(f"/proc/{self.process.pid}/task")
        except OSError:
            return 0.0
        for task in tasks:
            try:
                with open(f"/proc/{self.process.pid}/task/{task}/schedstat") as handle:
                    total += int(handle.read().split()[0])
            except (OSError, IndexError, ValueError):  # a thread that ended since the listing
                continue
        return total / 1e9

    def stop(self) -> None:
        self.client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Server(Endpoint):
    """`nudges serve`: a temporary SQLite database in `workdir` unless a database URL is given, the clock
    pinned (so every run sees the same windows) and hot reload off (no rescans mid-measurement)."""

    hook_path = f"/cds-services/{SERVICE}"

    def __init__(self, rules: Path, workdir: Path, *, database_url: str | None = None, workers: int = 1) -> None:
        super().__init__(workdir)
        self.rules = rules
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUDGES_")}
        env.update(NUDGES_NOW=NOW, NUDGES_RELOAD_INTERVAL_SECONDS="0", NUDGES_LOG_LEVEL="WARNING")
        command = [*nudges_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--database-url", database_url or f"sqlite:///{workdir / 'bench.db'}", "--rules", str(rules),
                   "--workers", str(workers)]
        self.launch(command, env, workdir)
        self.ready: dict[str, Any] = {}
        self.keys: list[str] = []
        self.prefetch: dict[str, str] = {}  # key -> query template, as discovery lists them

    def wait_ready(self, timeout: float = 120) -> None:
        self.ready = self.wait_for("/readyz", timeout).json()
        response = self.client.get("/cds-services")
        response.raise_for_status()
        services = {s["id"]: s for s in response.json()["services"]}
        self.prefetch = dict(services[SERVICE]["prefetch"])
        self.keys = list(self.prefetch)


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


class Numbers:
    """Patient numbers are never reused, so no call is suppressed by an earlier one."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n


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

