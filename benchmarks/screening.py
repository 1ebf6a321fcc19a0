"""Population screening throughput: patients per second per core, and the 1 → 2 worker scaling, in one run.

A script, not a test (timings on a shared machine are not a pass/fail matter). It writes a synthetic Bulk
Data export with a realistic mix, then screens it with `nudges screen`'s own code on a local Dask cluster
of one worker and of two (warmed up first, so the figures are steady state and not rule loading), checks
that both runs give byte-identical worklists, and prints the figures.

The mix, per patient (about 40 resources on average): a Patient with varied demographics (race and
ethnicity extensions, language, birth date), one or two Coverages, ambulatory encounters, vital signs and
routine labs (half of the labs coded twice: LOINC and a local lab code), problem-list conditions,
medication orders coded three ways (medicationCodeableConcept at product level, a contained Medication,
or `medicationReference` to a Medication elsewhere in the export), and for most patients the clinical
content of one of the shipped fixture records (fhir_fixtures/patients: every rule's firing and near-miss
record), re-identified for that patient, so every rule of the catalog (rules/) has candidates to look at
and fires for some. Dates are around the pinned instant.

    python benchmarks/screening.py                   # 20,000 patients, 1 and 2 workers
    python benchmarks/screening.py --patients 2000 --quick
    python benchmarks/screening.py --profile         # where one worker's time goes, in process
    python benchmarks/screening.py --json
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import hashlib
import io
import os
import pstats
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nudges.clock import parse_instant  # noqa: E402
from nudges.fhir import instant  # noqa: E402

NOW = "2026-03-02T12:00:00Z"
LOCAL_LAB = "http://hospital.example.org/fhir/CodeSystem/lab-codes"
RACES = [("2106-3", "White"), ("2054-5", "Black or African American"), ("2028-9", "Asian"),
         ("1002-5", "American Indian or Alaska Native"), ("2076-8", "Native Hawaiian or Other Pacific Islander"),
         ("2131-1", "Other Race"), ("UNK", "Unknown")]
ETHNICITIES = [("2186-5", "Not Hispanic or Latino"), ("2135-2", "Hispanic or Latino"), ("ASKU", "Asked but unknown")]
LANGUAGES = ["en"] * 12 + ["es", "es", "es", "zh", "vi", "pt", "ht", "ru", "ar"]
Vital = tuple[str, str, str, float, float]  # LOINC, display, unit, low, high
Lab = tuple[str, str, str, float, float, str]  # the same and the local code of a dual-coded result
VITALS: list[Vital] = [
    ("8867-4", "Heart rate", "/min", 55, 110), ("8480-6", "Systolic blood pressure", "mm[Hg]", 95, 170),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 55, 100), ("29463-7", "Body weight", "kg", 45, 130),
    ("9279-1", "Respiratory rate", "/min", 10, 24), ("8310-5", "Body temperature", "Cel", 36, 38.5),
    ("39156-5", "Body mass index", "kg/m2", 17, 42)]
LABS: list[Lab] = [
    ("2951-2", "Sodium", "mmol/L", 130, 148, "NA"), ("2823-3", "Potassium", "mmol/L", 3.2, 5.4, "K"),
    ("2345-7", "Glucose", "mg/dL", 70, 220, "GLU"), ("718-7", "Hemoglobin", "g/dL", 9, 17, "HGB"),
    ("6690-2", "Leukocytes", "10*3/uL", 3, 14, "WBC"), ("777-3", "Platelets", "10*3/uL", 120, 420, "PLT"),
    ("2160-0", "Creatinine", "mg/dL", 0.6, 2.4, "CREAT")]
PROBLEMS = [("I10", "Essential (primary) hypertension"), ("E78.5", "Hyperlipidemia, unspecified"),
            ("J45.909", "Unspecified asthma, uncomplicated"), ("M54.50", "Low back pain, unspecified"),
            ("K21.9", "Gastro-esophageal reflux disease without esophagitis"),
            ("F41.1", "Generalized anxiety disorder")]
DRUGS = [("197361", "amlodipine 5 MG Oral Tablet"), ("314076", "lisinopril 10 MG Oral Tablet"),
         ("617312", "atorvastatin 40 MG Oral Tablet"), ("860975", "metformin hydrochloride 500 MG Oral Tablet"),
         ("310798", "hydrochlorothiazide 25 MG Oral Tablet")]
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


# -- the synthetic export --------------------------------------------------------------------------------------
def fixture_records() -> list[list[dict[str, Any]]]:
    """Each shipped fixture record's resources (firing and near-miss records of every rule)."""
    records = []
    for path in sorted((ROOT / "fhir_fixtures" / "patients").glob("*.json")):
        data = orjson.loads(path.read_bytes())
        resources = [e["resource"] for e in data.get("entry", []) if isinstance(e.get("resource"), dict)]
        if any(r.get("resourceType") == "Patient" for r in resources):
            records.append(resources)
    return records


def _rewrite(node: Any, ids: dict[str, str]) -> Any:
    """References to resources of the record, re-pointed at their new ids."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in ids:
                out[key] = ids[value]
            else:
                out[key] = _rewrite(value, ids)
        return out
    if isinstance(node, list):
        return [_rewrite(v, ids) for v in node]
    return node


def _when(rnd: random.Random, now: datetime, days: float) -> str:
    return instant(now - timedelta(days=rnd.uniform(0, days), minutes=rnd.randrange(0, 1440)))


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def medication_forms(resource: dict[str, Any], form: int, pid: str, n: int) -> list[dict[str, Any]]:
    """A medication[x] resource coded the way EHRs send it: 0 inline, 1 a contained Medication, 2 a
    reference to a Medication resource of the export (returned, to be written to Medication.ndjson)."""
    concept = resource.get("medicationCodeableConcept")
    if concept is None or form == 0:
        return []
    del resource["medicationCodeableConcept"]
    if form == 1:
        resource["contained"] = [{"resourceType": "Medication", "id": "med", "code": concept}]
        resource["medicationReference"] = {"reference": "#med"}
        return []
    medication = {"resourceType": "Medication", "id": f"{pid}-med-{n}", "code": concept}
    resource["medicationReference"] = {"reference": f"Medication/{medication['id']}"}
    return [medication]


def synthetic_patient(index: int, rnd: random.Random, records: list[list[dict[str, Any]]],
                      now: datetime) -> list[dict[str, Any]]:
    pid = f"pt{index:07d}"
    out: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    if records and rnd.random() < 0.7:
        base = copy.deepcopy(rnd.choice(records))
    ids = {}
    for n, resource in enumerate(base):
        old = f"{resource['resourceType']}/{resource.get('id')}"
        resource["id"] = pid if resource["resourceType"] == "Patient" else f"{pid}-f{n}"
        ids[old] = f"{resource['resourceType']}/{resource['id']}"
    base = [_rewrite(r, ids) for r in base]
    patient = next((r for r in base if r["resourceType"] == "Patient"), None)
    if patient is None:
        patient = {"resourceType": "Patient", "id": pid, "gender": rnd.choice(["female", "male"]),
                   "birthDate": f"{rnd.randint(1935, 2012)}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}"}
        base.insert(0, patient)
    race, ethnicity = rnd.choice(RACES), rnd.choice(ETHNICITIES)
    patient["extension"] = [e for e in patient.get("extension") or () if "us-core-race" not in e.get("url", "")
                            and "us-core-ethnicity" not in e.get("url", "")] + [
        {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": [
            {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": race[0],
                                                   "display": race[1]}}, {"url": "text", "valueString": race[1]}]},
        {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity", "extension": [
            {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                   "code": ethnicity[0], "display": ethnicity[1]}},
            {"url": "text", "valueString": ethnicity[1]}]}]
    if "communication" not in patient:
        patient["communication"] = [{"language": _coding("urn:ietf:bcp:47", rnd.choice(LANGUAGES), "language"),
                                     "preferred": True}]
    subject = {"reference": f"Patient/{pid}"}
    if not any(r["resourceType"] == "Coverage" for r in base):
        out.append({"resourceType": "Coverage", "id": f"{pid}-cov", "status": "active", "beneficiary": subject,
                    "payor": [{"display": "Payer"}], "type": {"coding": [
                        {"system": "urn:oid:2.16.840.1.113883.3.221.5", "code": rnd.choice("1125589")}]}})
    encounters: list[dict[str, Any]] = []
    for n in range(rnd.randint(1, 5)):
        start = _when(rnd, now, 365)
        encounters.append({"resourceType": "Encounter", "id": f"{pid}-enc{n}", "status": "finished",
                           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                           "type": [_coding("http://snomed.info/sct", "185349003", "Encounter for check up")],
                           "subject": subject, "period": {"start": start, "end": start}})
    out += encounters
    for n in range(rnd.randint(10, 24)):
        code, display, unit, low, high = rnd.choice(VITALS)
        encounter = rnd.choice(encounters)
        out.append({"resourceType": "Observation", "id": f"{pid}-vs{n}", "status": "final",
                    "category": [_coding("http://terminology.hl7.org/CodeSystem/observation-category",
                                         "vital-signs", "Vital Signs")],
                    "code": _coding("http://loinc.org", code, display), "subject": subject,
                    "encounter": {"reference": f"Encounter/{encounter['id']}"},
                    "effectiveDateTime": encounter["period"]["start"],
                    "valueQuantity": {"value": round(rnd.uniform(low, high), 1), "unit": unit,
                                      "system": "http://unitsofmeasure.org", "code": unit}})
    for n in range(rnd.randint(4, 14)):
        code, display, unit, low, high, local = rnd.choice(LABS)
        concept = _coding("http://loinc.org", code, display)
        if n % 2:  # dual-coded, as many labs send them
            concept["coding"].append({"system": LOCAL_LAB, "code": local, "display": display.upper()})
        value = round(rnd.uniform(low, high), 2)
        out.append({"resourceType": "Observation", "id": f"{pid}-lab{n}", "status": "final",
                    "category": [_coding("http://terminology.hl7.org/CodeSystem/observation-category",
                                         "laboratory", "Laboratory")],
                    "code": concept, "subject": subject, "effectiveDateTime": _when(rnd, now, 365),
                    "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org",
                                      "code": unit},
                    "referenceRange": [{"low": {"value": low * 1.1}, "high": {"value": high * 0.9}}]})
    for n in range(rnd.randint(0, 4)):
        code, display = rnd.choice(PROBLEMS)
        out.append({"resourceType": "Condition", "id": f"{pid}-cond{n}", "subject": subject,
                    "clinicalStatus": _coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active",
                                              "Active"),
                    "category": [_coding("http://terminology.hl7.org/CodeSystem/condition-category",
                                         "problem-list-item", "Problem List Item")],
                    "code": _coding("http://hl7.org/fhir/sid/icd-10-cm", code, display),
                    "recordedDate": _when(rnd, now, 900)})
    medications: list[dict[str, Any]] = []
    for n in range(rnd.randint(0, 5)):
        code, display = rnd.choice(DRUGS)
        order = {"resourceType": "MedicationRequest", "id": f"{pid}-mr{n}", "status": rnd.choice(
            ["active", "active", "completed", "stopped"]), "intent": "order", "subject": subject,
            "authoredOn": _when(rnd, now, 400), "medicationCodeableConcept": _coding(RXNORM, code, display)}
        medications += medication_forms(order, n % 3, pid, n)
        out.append(order)
    for n, resource in enumerate(base):
        if resource["resourceType"] in ("MedicationRequest", "MedicationAdministration", "MedicationStatement",
                                        "MedicationDispense"):
            medications += medication_forms(resource, (index + n) % 3, pid, 100 + n)
        if resource["resourceType"] == "Observation" and index % 2 and isinstance(resource.get("code"), dict):
            for coding in list(resource["code"].get("coding") or ()):
                if coding.get("system") == "http://loinc.org":
                    resource["code"]["coding"].append({"system": LOCAL_LAB, "code": f"L{coding.get('code')}"})
    return base + out + medications


def write_export(folder: Path, patients: int, seed: int = 7) -> dict[str, int]:
    """NDJSON files per type (Observation in two files), as a server's export names them."""
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)  # the same export for the same seed
    records = fixture_records()
    now = parse_instant(NOW)
    streams: dict[str, Any] = {}
    counts: dict[str, int] = {}
    try:
        for index in range(patients):
            for resource in synthetic_patient(index, rnd, records, now):
                kind = resource["resourceType"]
                name = f"{kind}.{1 + index % 2:03d}.ndjson" if kind == "Observation" else f"{kind}.ndjson"
                stream = streams.get(name) or streams.setdefault(name, open(folder / name, "wb"))  # noqa: SIM115
                stream.write(orjson.dumps(resource) + b"\n")
                counts[kind] = counts.get(kind, 0) + 1
    finally:
        for stream in streams.values():
            stream.close()
    return counts


# -- measuring ------------------------------------------------------------------------------------------------
def load_services() -> tuple[Any, Any]:
    from nudges.settings import Settings
    from nudges.tools.loading import load_services as load

    settings = Settings(rules=ROOT / "rules")
    services = load(settings.rules, settings.rule_statuses, io.StringIO(), settings.site_valuesets)
    if services is None:
        raise SystemExit("the rule set in rules/ does not load: run nudges lint rules")
    return settings, services


def run_once(files: list[Path], settings: Any, services: Any, runner: Any, work: Path,
             hook: str = "patient-view") -> Any:
    from nudges.screening.run import screen_export

    return screen_export(files, services, rules=settings.rules, site=settings.site_valuesets,
                         statuses=tuple(settings.rule_statuses), hook=hook, now=parse_instant(NOW), runner=runner,
                         work=work, err=io.StringIO())


def worklist_digest(tally: Any, services: Any, folder: Path) -> str:
    from nudges.screening.outputs import write_worklists

    rules = sorted(r.id for r in services.for_hook("patient-view").rules)
    write_worklists(tally, rules, folder)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def measure(files: list[Path], workers: int, settings: Any, services: Any, scratch: Path,
            warmup: list[Path]) -> dict[str, Any]:
    """One local cluster of `workers` processes: warmed up on a small export (each worker loads the rules),
    then timed on the whole one."""
    from nudges.screening.cluster import DaskRunner

    started = time.perf_counter()
    runner = DaskRunner(workers, None, scratch / f"dask-{workers}")
    startup = time.perf_counter() - started
    try:
        run_once(warmup, settings, services, runner, Path(tempfile.mkdtemp(dir=scratch)))
        work = Path(tempfile.mkdtemp(dir=scratch))
        started = time.perf_counter()
        tally = run_once(files, settings, services, runner, work)
        elapsed = time.perf_counter() - started
    finally:
        runner.close()
    digest = worklist_digest(tally, services, scratch / f"worklists-{workers}")
    return {"workers": workers, "cluster_start_s": round(startup, 2), "patients": tally.patients,
            "resources": tally.resources + tally.joined, "cards": sum(tally.cards.values()),
            "shard_s": round(tally.seconds["shard"], 2), "screen_s": round(tally.seconds["screen"], 2),
            "total_s": round(elapsed, 2), "worklists_sha256": digest,
            "screen_patients_per_s_per_core": round(tally.patients / tally.seconds["screen"] / workers),
            "screen_patients_per_cpu_s": round(tally.patients / tally.cpu_seconds),
            "shard_patients_per_cpu_s": round(tally.patients / tally.shard_cpu_seconds),
            "end_to_end_patients_per_s_per_core": round(tally.patients / elapsed / workers),
            "rules_fired": len(tally.cards), "skipped": sum(tally.skipped.values()),
            "errors": sum(tally.errors.values())}


def profile(files: list[Path], settings: Any, services: Any, scratch: Path, out: Any) -> None:
    """One worker's screening in this process under cProfile: time by pipeline stage."""
    from nudges.screening.cluster import InProcess
    from nudges.screening.tasks import Job, remember

    remember(Job(str(settings.rules), None, tuple(settings.rule_statuses), services.ruleset.digest, "patient-view",
                 NOW, ""), services)
    profiler = cProfile.Profile()
    profiler.enable()
    tally = run_once(files, settings, services, InProcess(), Path(tempfile.mkdtemp(dir=scratch)))
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    stages = {"shard the export (split_chunk, in all)": ("split_chunk",),
              "  of which reading heads (Heads.decode_line)": ("decode_line",),
              "  of which parsing kept lines (orjson)": ("loads",),
              "screen the shards (screen_shard, in all)": ("screen_shard",),
              "  read shard files": ("read_shard",), "  build the call body (request_for)": ("request_for",),
              "  validate the request (pydantic)": ("parse_call",), "  index the record": ("build_record",),
              "  rules (engine.evaluate)": ("evaluate_rule",), "  cards (cards.card_head)": ("card_head",),
              "  demographic bucket": ("bucket",), "  evidence for the worklist": ("evidence",)}
    found: dict[str, float] = {}
    for (path, _, name), (_, _, _, cumulative, callers) in stats.stats.items():  # type: ignore[attr-defined]
        for stage, names in stages.items():
            if names == ("loads",):
                if "orjson.loads" in name:  # only the calls made while sharding
                    found[stage] = found.get(stage, 0.0) + sum(
                        c[3] for (cpath, _, cname), c in callers.items() if cname == "_parse")
            elif name in names and "nudges" in path:
                found[stage] = found.get(stage, 0.0) + cumulative
    out.write(f"profile: {tally.patients} patients in {total:.2f} s in process under cProfile (which slows "
              f"Python code about 2x); share of the profiled time:\n")
    for stage in stages:
        seconds = found.get(stage, 0.0)
        out.write(f"  {stage:<44} {seconds:7.2f} s  {100 * seconds / total:5.1f} %\n")
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(25)
    out.write(buffer.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="2,000 patients: a smoke run")
    parser.add_argument("--profile", action="store_true", help="where the time goes, in process (no cluster)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    patients = 2_000 if args.quick else args.patients
    with tempfile.TemporaryDirectory(prefix="nudges-bench-screen-") as folder:
        scratch = Path(folder)
        started = time.perf_counter()
        counts = write_export(scratch / "export", patients)
        write_export(scratch / "warmup", 200, seed=8)
        generated = time.perf_counter() - started
        files = sorted((scratch / "export").glob("*.ndjson"))
        warmup = sorted((scratch / "warmup").glob("*.ndjson"))
        settings, services = load_services()
        if args.profile:
            profile(files, settings, services, scratch, sys.stdout)
            return 0
        runs = [measure(files, workers, settings, services, scratch, warmup) for workers in (1, 2)]
    one, two = runs
    result = {
        "patients": patients, "resources": sum(counts.values()),
        "resources_per_patient": round(sum(counts.values()) / patients, 1), "types": counts,
        "rules": len(services.for_hook("patient-view").rules), "generated_s": round(generated, 1),
        "cores": len(os.sched_getaffinity(0)), "load_average": [round(x, 2) for x in os.getloadavg()],
        "runs": runs, "scaling_1_to_2": round(one["screen_s"] / two["screen_s"], 2),
        "scaling_1_to_2_end_to_end": round(one["total_s"] / two["total_s"], 2),
        "identical_worklists": one["worklists_sha256"] == two["worklists_sha256"]}
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0 if result["identical_worklists"] else 1
    out = sys.stdout
    out.write(f"export: {patients} patients, {result['resources']} resources ({result['resources_per_patient']} per "
              f"patient), {result['rules']} patient-view rules; {result['cores']} cores, load average "
              f"{result['load_average']}\n")
    for run in runs:
        out.write(f"{run['workers']} worker(s): shard {run['shard_s']} s, screen {run['screen_s']} s "
                  f"({run['screen_patients_per_s_per_core']} patients/s per core; per CPU second of the workers: "
                  f"{run['screen_patients_per_cpu_s']} screening, {run['shard_patients_per_cpu_s']} sharding), "
                  f"whole run {run['total_s']} s "
                  f"({run['end_to_end_patients_per_s_per_core']} patients/s per core); {run['cards']} cards from "
                  f"{run['rules_fired']} rules, {run['skipped']} skipped, {run['errors']} rule errors "
                  f"(cluster start {run['cluster_start_s']} s, not counted)\n")
    out.write(f"scaling 1 -> 2 workers: {result['scaling_1_to_2']}x screening, "
              f"{result['scaling_1_to_2_end_to_end']}x whole run; worklists identical: "
              f"{result['identical_worklists']}\n")
    return 0 if result["identical_worklists"] else 1


if __name__ == "__main__":
    sys.exit(main())
