"""Equity statistics and the trend's disclosure control: known values, both databases, and a brute-force
check that no withheld count can be worked out from what the dashboard shows."""

from __future__ import annotations

import hashlib
import io
import uuid
from datetime import timedelta
from typing import Any

import orjson
import pytest

from nudges.cli import main
from nudges.clock import FixedClock
from nudges.store import Bucket, CardRecord, FeedbackRecord, Store
from nudges.tools import equity
from nudges.tools.audit import Cell
from nudges.tools.disclosure import determined, structure, withheld_trend


def test_wilson_interval_matches_published_values() -> None:
    # Newcombe (1998), Table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605; 0/10 -> 0-0.2775
    assert equity.wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert equity.wilson(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)
    low, high = equity.wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=5e-5)


def test_two_proportion_test() -> None:
    # 40/100 against 60/100: z = -2.828, two-sided p = 0.00468
    assert equity.two_proportion_p(40, 100, 60, 100) == pytest.approx(0.004678, abs=1e-5)
    assert equity.two_proportion_p(50, 100, 50, 100) == pytest.approx(1.0)
    assert equity.two_proportion_p(5, 10, 0, 0) is None


def cells(rule: str, groups: dict[str, tuple[int, int, int]]) -> list[Cell]:
    """(shown, accepted, patients) per race group; the overall row is their sum."""
    shown = sum(g[0] for g in groups.values())
    out = [Cell(rule, "overall", "all", shown, sum(g[1] for g in groups.values()), 0,
                sum(g[2] for g in groups.values()))]
    return out + [Cell(rule, "race", name, s, a, 0, p) for name, (s, a, p) in sorted(groups.items())]


def test_flag_needs_significance_and_ten_percent() -> None:
    stats = {s.group: s for s in equity.statistics(cells("r", {
        "a": (400, 200, 400),   # 50 % against 70 % for the others: significant and large
        "b": (400, 280, 400),
        "c": (400, 276, 400),   # 69 % against 64 %: 1.08 of the overall, not 10 % off
    }))}
    assert stats["a"].flag and stats["a"].rate_ratio == pytest.approx(0.5 / (756 / 1200), abs=1e-3)
    assert not stats["c"].flag and stats["c"].p_value is not None
    small = {s.group: s for s in equity.statistics(cells("r", {"a": (20, 10, 20), "b": (20, 14, 20)}))}
    assert abs(small["a"].rate_difference or 0) / 0.6 >= 0.1 and not small["a"].flag  # large, not significant


def test_a_suppressed_group_gets_no_numbers_and_no_share() -> None:
    stats = equity.statistics(cells("r", {"white": (60, 40, 30), "black": (40, 20, 25), "unknown": (8, 4, 5)}))
    by_group = {s.group: s for s in stats}
    assert by_group["unknown"].status == "<11" and by_group["unknown"].shown is None
    assert by_group["black"].status == "hidden" and by_group["black"].acceptance_rate is None
    assert by_group["white"].visible and by_group["white"].ci_low is not None
    race = next(m for m in equity.missing_shares(stats) if m.dimension == "race")
    assert race.share is None  # made of a withheld cell: withheld too


def brute_force_values(shown: dict, hidden: set, lines: list, bound: int = 14) -> dict:
    """Every value each withheld count takes over all non-negative integer tables that agree with what is
    shown (the sums and the shown counts): the ground truth the elimination must match."""
    unknown = sorted(hidden)
    seen: dict = {k: set() for k in unknown}
    # Each sum is checked as soon as its last withheld count has a value: the same tables as trying every
    # combination, without walking the ones an earlier sum already rules out.
    last = {id(line): max((unknown.index(k) for k, _ in line.members if k in hidden), default=-1) for line in lines}
    due = {i: [line for line in lines if last[id(line)] == i] for i in range(-1, len(unknown))}

    def holds(table: dict, line: Any) -> bool:
        return sum(sign * table[k] for k, sign in line.members) == 0

    if not all(holds(shown, line) for line in due[-1]):
        return seen

    def fill(i: int, table: dict) -> None:
        if i == len(unknown):
            for k in unknown:
                seen[k].add(table[k])
            return
        for value in range(1, bound):
            table[unknown[i]] = value
            if all(holds(table, line) for line in due[i]):
                fill(i + 1, table)
        del table[unknown[i]]

    fill(0, dict(shown))
    return seen


def test_no_withheld_trend_count_can_be_worked_out() -> None:
    """Two groups over two months: one tiny month cell. Withholding it and one neighbour per line is not
    enough (the row, the column and the totals give it away); the result must leave every withheld count
    with more than one possible value, which a brute-force search over all consistent tables confirms."""
    rule = "r"
    month_cells = [Cell(rule, "overall", "all", 24, 0, 0, 24, "2026-01"), Cell(rule, "overall", "all", 26, 0, 0, 26,
                                                                              "2026-02"),
                   Cell(rule, "race", "a", 3, 0, 0, 3, "2026-01"), Cell(rule, "race", "a", 13, 0, 0, 13, "2026-02"),
                   Cell(rule, "race", "b", 21, 0, 0, 21, "2026-01"), Cell(rule, "race", "b", 13, 0, 0, 13, "2026-02")]
    totals = [Cell(rule, "overall", "all", 50, 0, 0, 50), Cell(rule, "race", "a", 16, 0, 0, 16),
              Cell(rule, "race", "b", 34, 0, 0, 34)]
    hidden = withheld_trend(totals, set(), month_cells)
    assert ("x", "race", "a", "2026-01") in hidden
    _patients, lines = structure(totals, month_cells)
    assert not determined(hidden, lines)
    values = {("G",): 50, ("T", "race", "a"): 16, ("T", "race", "b"): 34, ("M", "2026-01"): 24, ("M", "2026-02"): 26,
              ("x", "race", "a", "2026-01"): 3, ("x", "race", "a", "2026-02"): 13, ("x", "race", "b", "2026-01"): 21,
              ("x", "race", "b", "2026-02"): 13}
    shown = {k: v for k, v in values.items() if k not in hidden}
    possible = brute_force_values(shown, hidden, lines, bound=40)
    assert all(len(v) > 1 for v in possible.values()), possible


def test_a_withheld_group_total_stays_hidden_in_the_trend() -> None:
    """A group hidden in the audit's table (a complement) must not be rebuilt by adding up its months."""
    rule = "r"
    totals = [Cell(rule, "overall", "all", 70, 0, 0, 70), Cell(rule, "race", "a", 5, 0, 0, 5),
              Cell(rule, "race", "b", 25, 0, 0, 25), Cell(rule, "race", "c", 40, 0, 0, 40)]
    months = [Cell(rule, "overall", "all", 35, 0, 0, 35, m) for m in ("2026-01", "2026-02")]
    months += [Cell(rule, "race", "b", 12, 0, 0, 12, "2026-01"), Cell(rule, "race", "b", 13, 0, 0, 13, "2026-02"),
               Cell(rule, "race", "c", 20, 0, 0, 20, "2026-01"), Cell(rule, "race", "c", 20, 0, 0, 20, "2026-02"),
               Cell(rule, "race", "a", 3, 0, 0, 3, "2026-01"), Cell(rule, "race", "a", 2, 0, 0, 2, "2026-02")]
    hidden = withheld_trend(totals, {("T", "race", "a"), ("T", "race", "b")}, months)
    assert {("x", "race", "b", "2026-01"), ("x", "race", "b", "2026-02")} <= hidden
    _, lines = structure(totals, months)
    assert not determined(hidden, lines)


# -- on the databases ---------------------------------------------------------------------------------------
def record(store: Store, clock: FixedClock, rule: str, person: str, bucket: Bucket, outcome: str | None,
           days_ago: int) -> None:
    card = str(uuid.uuid4())
    issued = clock.now() - timedelta(days=days_ago)
    store.record_cards([CardRecord(card, "nudges-patient-view", rule, "1.0.0", "patient-view", card[:32],
                                   hashlib.sha256(f"{rule}/{person}".encode()).hexdigest(), bucket, "warning",
                                   issued)])
    if outcome:
        store.record_feedback([FeedbackRecord(card, "nudges-patient-view", outcome, issued + timedelta(minutes=5),
                                              ("s",) if outcome == "accepted" else ())])


def test_report_on_the_database_by_month_with_a_suppressed_group(store: Store, clock: FixedClock) -> None:
    rule = f"equity-{uuid.uuid4().hex[:8]}"
    white = Bucket("white", "not-hispanic-latino", "en", "private")
    black = Bucket("black", "not-hispanic-latino", "en", "medicaid")
    asian = Bucket("asian", "not-hispanic-latino", "zh", "private")
    for i in range(30):
        record(store, clock, rule, f"w{i}", white, "accepted" if i % 3 else "overridden", 2 if i < 15 else 40)
        record(store, clock, rule, f"b{i}", black, "accepted" if i % 2 else None, 2 if i < 15 else 40)
    for i in range(4):
        record(store, clock, rule, f"a{i}", asian, "accepted", 2)
    with store.engine.connect() as conn:
        report = equity.load(conn, None)
    stats = {(s.dimension, s.group): s for s in report.stats if s.rule == rule}
    assert stats[("race", "asian")].status == "<11"
    assert stats[("race", "white")].shown == 30 and stats[("race", "white")].accepted == 20
    months = sorted({p.month for p in report.trend if p.rule == rule})
    assert months == ["2026-01", "2026-02"]  # 2 and 40 days before 2026-03-02, in UTC
    asian_points = [p for p in report.trend if p.rule == rule and p.group == "asian"]
    assert asian_points and all(p.shown is None and p.acceptance_rate is None for p in asian_points)
    # The CSV the console offers is what `nudges audit --format equity-csv` prints.
    out = io.StringIO()
    equity.write_csv(report, out)
    line = next(x for x in out.getvalue().splitlines() if x.startswith(f"{rule},race,asian,"))
    assert line == f"{rule},race,asian," + ",".join(["<11"] * 9) + ","


def test_cli_equity_formats(database_url: str, clock: FixedClock, store: Store,
                            capsys: pytest.CaptureFixture[str]) -> None:
    rule = f"equity-{uuid.uuid4().hex[:8]}"
    for i in range(12):
        record(store, clock, rule, f"p{i}", Bucket("white", "unknown", "en", "private"), "accepted", 1)
    assert main(["audit", "--database-url", database_url, "--format", "equity-json"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    overall = next(s for s in data["stats"] if s["rule"] == rule and s["dimension"] == "overall")
    assert overall["acceptance_rate"] == 1.0 and overall["ci_low"] == pytest.approx(12 / (12 + 1.959964 ** 2), abs=1e-4)
    ethnicity = next(m for m in data["missing"] if m["rule"] == rule and m["dimension"] == "ethnicity")
    assert ethnicity["share"] == 1.0
    assert main(["audit", "--database-url", database_url, "--format", "equity"]) == 0
    assert "two-proportion z-test" in capsys.readouterr().out


def test_a_trend_gap_does_not_say_whether_a_month_was_withheld_or_empty() -> None:
    """A group's months without cards have no point; withheld ones had cards. Drawn differently (a line
    across an empty month, a break at a withheld one, "n withheld" in the legend), the chart told in which
    months a small group had cards."""
    from nudges.api.console.charts import trend_lines
    from nudges.tools.equity import Point

    def point(group: str, month: str, rate: float | None) -> Point:
        return Point("r", "race", group, month, None if rate is None else 20, rate,
                     None if rate is None else rate - 0.1, None if rate is None else rate + 0.1)

    empty = [point("a", "2026-01", 0.5), point("a", "2026-03", 0.6)]  # no cards in February
    withheld = [point("a", "2026-01", 0.5), point("a", "2026-02", None), point("a", "2026-03", 0.6)]
    overall = [Point("r", "overall", "all", m, 40, 0.5, 0.4, 0.6) for m in ("2026-01", "2026-02", "2026-03")]
    assert str(trend_lines(overall + empty, "t")) == str(trend_lines(overall + withheld, "t"))
    assert "withheld" not in str(trend_lines(overall + withheld, "t"))
