"""`nudges audit` on both real databases: counts, rates, latest feedback wins, small-cell suppression."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from nudges.cli import main
from nudges.clock import FixedClock
from nudges.store import Bucket, CardRecord, FeedbackRecord, Store

KEYS = {"rule", "dimension", "group", "shown", "accepted", "overridden", "acceptance_rate", "rate_ratio"}


class History:
    """Cards and feedback for one rule whose id is unique to the test (the PostgreSQL schema is shared)."""

    def __init__(self, store: Store, clock: FixedClock) -> None:
        self.store, self.clock = store, clock
        self.rule = f"audit-{uuid.uuid4().hex[:8]}"
        self.hashes: list[str] = []

    def card(self, person: str, bucket: Bucket, *outcomes: str, days_ago: int = 0) -> None:
        patient_hash = hashlib.sha256(f"{self.rule}/{person}".encode()).hexdigest()
        self.hashes.append(patient_hash)
        card_uuid = str(uuid.uuid4())
        issued = self.clock.now() - timedelta(days=days_ago, hours=1)
        self.store.record_cards([CardRecord(
            uuid=card_uuid, service_id="nudges-patient-view", rule_id=self.rule, rule_version="1.0.0",
            hook="patient-view", hook_instance=str(uuid.uuid4()), patient_hash=patient_hash, bucket=bucket,
            indicator="warning", issued_at=issued)])
        for minutes, given in enumerate(outcomes, 1):  # later entries are later feedback
            outcome, _, code = given.partition(":")  # "overridden:patient-refuses": with that reason
            self.store.record_feedback([FeedbackRecord(
                card_uuid=card_uuid, service_id="nudges-patient-view", outcome=outcome,
                outcome_timestamp=issued + timedelta(minutes=minutes),
                accepted_suggestions=("s1",) if outcome == "accepted" else (), override_code=code or None,
                override_system="http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes" if code else None)])


BLACK = Bucket(race="black", ethnicity="not-hispanic-latino", language="es", payer_class="medicaid")
WHITE = Bucket(race="white", ethnicity="not-hispanic-latino", language="en", payer_class="private")
ASIAN = Bucket(race="asian", ethnicity="not-hispanic-latino", language="en", payer_class="private")
OTHER = Bucket(race="other", ethnicity="hispanic-latino", language="en", payer_class="self-pay")


def seed(store: Store, clock: FixedClock) -> History:
    history = History(store, clock)
    for i in range(20):  # 20 patients, one card each: 11 accepted (one after an override), 4 overridden
        outcomes = {10: ("overridden", "accepted")}.get(i, ("accepted",) if i < 10 else
                                                        ("overridden",) if i < 15 else ())
        history.card(f"b{i}", BLACK, *outcomes)
    for i in range(15):  # 15 patients, two cards each: 24 accepted, 2 overridden (one after acceptance)
        first = ("accepted",) if i < 12 else ("overridden",) if i == 12 else \
            ("accepted", "overridden") if i == 14 else ()
        history.card(f"w{i}", WHITE, *first)
        history.card(f"w{i}", WHITE, *(("accepted",) if i < 12 else ()))
    for i in range(5):  # 15 cards but only 5 patients: suppressed
        for _ in range(3):
            history.card(f"a{i}", ASIAN, "accepted")
    for i in range(12):  # a month ago: only without --since
        history.card(f"o{i}", OTHER, days_ago=30)
    return history


def audit(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> str:
    assert main(["audit", "--database-url", url, *args]) == 0
    return capsys.readouterr().out


def mine(rows: list[dict[str, Any]], rule: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["dimension"], r["group"]): r for r in rows if r["rule"] == rule}


def test_counts_rates_and_suppression(capsys: pytest.CaptureFixture[str], store: Store, clock: FixedClock,
                                      database_url: str) -> None:
    history = seed(store, clock)
    rows = orjson.loads(audit(capsys, database_url, "--format", "json", "--since", "2026-02-23"))
    assert all(set(r) == KEYS for r in rows)
    table = mine(rows, history.rule)
    overall = table[("overall", "all")]
    assert (overall["shown"], overall["accepted"], overall["overridden"]) == (65, 50, 6)
    assert overall["acceptance_rate"] == round(50 / 65, 4) and overall["rate_ratio"] == 1.0
    black = table[("race", "black")]
    assert (black["shown"], black["accepted"], black["overridden"]) == (20, 11, 4)
    assert black["acceptance_rate"] == 0.55 and black["rate_ratio"] == round(0.55 / (50 / 65), 3)
    assert table[("race", "asian")] == {"rule": history.rule, "dimension": "race", "group": "asian",
                                        "shown": "<11", "accepted": "<11", "overridden": "<11",
                                        "acceptance_rate": None, "rate_ratio": None}
    # asian = overall - black - white: the smallest other group (white, 15 patients) is withheld too
    assert table[("race", "white")] == {"rule": history.rule, "dimension": "race", "group": "white",
                                        "shown": "hidden", "accepted": "hidden", "overridden": "hidden",
                                        "acceptance_rate": None, "rate_ratio": None}
    assert ("race", "other") not in table  # issued before --since
    assert (table[("language", "en")]["shown"], table[("language", "en")]["accepted"]) == (45, 39)
    assert table[("language", "es")]["shown"] == 20
    assert table[("payer_class", "private")]["overridden"] == 2
    assert table[("ethnicity", "not-hispanic-latino")]["shown"] == 65
    dimensions = [d for d, _ in table]
    assert dimensions == sorted(dimensions, key=["overall", "race", "ethnicity", "language",
                                                 "payer_class"].index)

    everything = mine(orjson.loads(audit(capsys, database_url, "--format", "json")), history.rule)
    assert everything[("overall", "all")]["shown"] == 77
    # now the smallest group beside asian is "other" (12 patients): it is withheld, white is shown
    assert everything[("race", "other")]["shown"] == "hidden" and everything[("race", "white")]["shown"] == 30
    assert everything[("race", "white")]["acceptance_rate"] == 0.8
    assert everything[("ethnicity", "hispanic-latino")]["accepted"] == 0
    assert everything[("ethnicity", "hispanic-latino")]["rate_ratio"] == 0.0


def test_a_rule_with_few_patients_is_suppressed_everywhere(capsys: pytest.CaptureFixture[str], store: Store,
                                                           clock: FixedClock, database_url: str) -> None:
    history = History(store, clock)
    for i in range(10):
        history.card(f"p{i}", BLACK, "accepted")
        history.card(f"p{i}", BLACK, "accepted")
    rows = mine(orjson.loads(audit(capsys, database_url, "--format", "json")), history.rule)
    assert rows and all(r["shown"] == "<11" and r["acceptance_rate"] is None for r in rows.values())
    history.card("p10", WHITE)  # the eleventh patient lifts the overall row, groups stay suppressed
    rows = mine(orjson.loads(audit(capsys, database_url, "--format", "json")), history.rule)
    assert rows[("overall", "all")]["shown"] == 21 and rows[("race", "black")]["shown"] == "<11"
    assert rows[("race", "white")]["shown"] == "<11"  # 10 + 1 patients: nothing more to withhold
    for i in range(11, 23):
        history.card(f"p{i}", ASIAN)
    rows = mine(orjson.loads(audit(capsys, database_url, "--format", "json")), history.rule)
    assert rows[("race", "asian")]["shown"] == 12  # black and white together cover 11 patients
    assert rows[("race", "black")]["shown"] == rows[("race", "white")]["shown"] == "<11"


def test_csv_and_table_and_no_patient_hashes(capsys: pytest.CaptureFixture[str], store: Store,
                                             clock: FixedClock, database_url: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    history = seed(store, clock)
    text = audit(capsys, database_url, "--format", "csv", "--since", "2026-02-23T00:00:00Z")
    reader = list(csv.reader(io.StringIO(text)))
    assert reader[0] == ["rule", "dimension", "group", "shown", "accepted", "overridden", "acceptance_rate",
                         "rate_ratio"]
    rows = {(r[1], r[2]): r for r in reader[1:] if r[0] == history.rule}
    assert rows[("race", "asian")][3:] == ["<11"] * 5
    assert rows[("race", "black")][3:6] == ["20", "11", "4"] and rows[("race", "black")][6] == "0.55"
    table = audit(capsys, database_url)
    line = next(row for row in table.splitlines() if history.rule in row and " asian " in row)
    assert line.split()[3:] == ["<11"] * 5
    assert "55.0%" in next(row for row in table.splitlines() if history.rule in row and " black " in row)
    monkeypatch.setenv("NUDGES_DATABASE_URL", database_url)  # the service's default database
    assert main(["audit", "--format", "json"]) == 0
    default = capsys.readouterr().out
    assert history.rule in default
    for output in (text, table, default, audit(capsys, database_url, "--format", "json")):
        assert not any(h in output or h[:16] in output for h in history.hashes)
        assert not re.search(r"[0-9a-f]{32}", output)
        assert "patients" not in output.split("row(s)")[0]


def test_a_missing_database_is_reported_not_created(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/absent.db"
    assert main(["audit", "--database-url", url]) == 1
    assert "no database" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()


def test_override_rates_and_reasons_with_small_cells_withheld(capsys: pytest.CaptureFixture[str], store: Store,
                                                              clock: FixedClock, database_url: str) -> None:
    history = History(store, clock)
    refuses, costly, busy = "overridden:patient-refuses", "overridden:too-costly-uncovered", "overridden:limited-time"
    for i in range(30):  # 12 refuse, 12 too costly, 3 limited time (then overridden again, later, with a reason)
        history.card(f"b{i}", BLACK, *([refuses] if i < 12 else [costly] if i < 24 else
                                       ["overridden", busy] if i < 27 else ["accepted"]))
    for i in range(25):  # 14 refuse, 2 limited time, 9 unanswered
        history.card(f"w{i}", WHITE, *([refuses] if i < 14 else [busy] if i < 16 else []))
    for i in range(5):  # a group of 5: withheld
        history.card(f"a{i}", ASIAN, refuses)
    history.card("w0", WHITE, "accepted", refuses, "accepted")  # the latest feedback counts
    rows = orjson.loads(audit(capsys, database_url, "--overrides", "--format", "json"))
    assert all(set(r) == {"rule", "dimension", "group", "reason", "shown", "overridden", "override_rate", "share"}
               for r in rows)
    table = {(r["dimension"], r["group"], r["reason"]): r for r in rows if r["rule"] == history.rule}
    overall = table[("overall", "all", "all")]
    assert (overall["shown"], overall["overridden"], overall["override_rate"]) == (61, 48, round(48 / 61, 4))
    assert table[("overall", "all", "patient-refuses")]["overridden"] == 31
    assert table[("overall", "all", "patient-refuses")]["share"] == round(31 / 48, 4)
    assert table[("overall", "all", "limited-time")]["overridden"] == "<11"  # 5 patients
    assert table[("overall", "all", "too-costly-uncovered")]["overridden"] == "hidden"  # else 48 - 31 - it
    black = table[("race", "black", "all")]
    assert (black["shown"], black["overridden"], black["override_rate"]) == (30, 27, 0.9)
    assert table[("race", "black", "too-costly-uncovered")] == {
        "rule": history.rule, "dimension": "race", "group": "black", "reason": "too-costly-uncovered", "shown": None,
        "overridden": 12, "override_rate": 0.4, "share": round(12 / 27, 4)}
    assert table[("race", "black", "limited-time")]["overridden"] == "<11"
    assert table[("race", "black", "patient-refuses")]["overridden"] == "hidden"
    assert table[("race", "asian", "all")]["shown"] == "<11" and table[("race", "white", "all")]["shown"] == "hidden"
    assert all(r["overridden"] in ("<11", "hidden") and r["override_rate"] is None
               for (d, g, _), r in table.items() if d == "race" and g in ("asian", "white"))
    # A withheld group lists no reasons: which reasons its few patients' cards were overridden with (or
    # that there were none) is itself a fact about them.
    withheld = {(d, g) for (d, g, why), r in table.items() if why == "all" and not isinstance(r["overridden"], int)}
    assert ("race", "asian") in withheld and ("race", "white") in withheld
    assert not [key for key in table if (key[0], key[1]) in withheld and key[2] != "all"]
    # Along either published margin (a group's overrides, a reason's overall count) never exactly one
    # withheld cell, which subtraction would give away.
    for key in {(d, g) for d, g, _ in table if isinstance(table[d, g, "all"]["overridden"], int)}:
        masked = [r for (d, g, why), r in table.items() if (d, g) == key and why != "all"
                  and r["overridden"] in ("<11", "hidden")]
        assert len(masked) != 1, key
    for dimension in ("race", "ethnicity", "language", "payer_class"):
        for why in ("patient-refuses", "too-costly-uncovered", "limited-time"):
            if not isinstance(table["overall", "all", why]["overridden"], int):
                continue
            masked = [r for (d, _, w), r in table.items() if d == dimension and w == why
                      and r["overridden"] in ("<11", "hidden")]
            unlisted = [g for d, g in withheld if d == dimension]  # their reasons are not shown at all
            assert len(masked) + len(unlisted) != 1, (dimension, why)
    text = audit(capsys, database_url, "--overrides")
    line = next(ln for ln in text.splitlines() if history.rule in ln and " black " in ln and "too-costly" in ln)
    assert line.split()[4:] == ["12", "40.0%", "44.4%"]
    assert "no rule is silenced" in text
    reader = list(csv.reader(io.StringIO(audit(capsys, database_url, "--overrides", "--format", "csv"))))
    assert reader[0][3:] == ["reason", "shown", "overridden", "override_rate", "share"]
    assert not any(h in text or h[:16] in text for h in history.hashes)
