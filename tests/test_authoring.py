"""The rule author's workbench: a rule set away from its repository, lint that helps, `nudges test` counts."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import ROOT

from nudges.cli import main

TROPONIN = "troponin-without-cath-plan"
RULE = Path("cardiology") / f"{TROPONIN}.yaml"
CASES = Path("cardiology") / f"{TROPONIN}.cases.yaml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def lone_rules(tmp_path: Path) -> Path:
    """A copy of the test rules on its own, without the seeds and fixtures folders beside it, with a seed
    citation and a case that reads a bundle from fhir_fixtures/."""
    target = tmp_path / "elsewhere" / "rules"
    shutil.copytree(ROOT / "tests" / "rules", target)
    edit(target / RULE, "citations:\n", "citations:\n  - seed: nejm-racial-disparities-ebook#p1\n")
    (tmp_path / "fixtures" / "fhir_fixtures" / "patients").mkdir(parents=True)
    bundle = '{"resourceType": "Bundle", "type": "collection", "entry": []}'
    (tmp_path / "fixtures" / "fhir_fixtures" / "patients" / "empty.json").write_text(bundle)
    edit(target / CASES, "    hook: encounter-start\n", "    hook: encounter-start\n"
                                                         "    bundle: fhir_fixtures/patients/empty.json\n")
    return target


def test_a_rule_set_copied_alone_names_its_missing_folders_once(lone_rules: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "lint", str(lone_rules))
    assert code == 1
    lines = out.splitlines()
    seeds = [line for line in lines if "seed" in line]
    assert len(seeds) == 1 and "ruleset.yaml:1:1: no seeds folder at" in seeds[0]
    assert f"the `seed:` citations of 1 rule(s) ({TROPONIN})" in seeds[0]
    assert any("fixtures folder" in line and "does not exist" in line for line in lines)
    missing = next(line for line in lines if "bundle 'fhir_fixtures/patients/empty.json' not found" in line)
    assert f"{lone_rules / 'cardiology'} and its parents" in missing  # where it looked
    assert missing.startswith(f"{lone_rules / CASES}:") or str(CASES) in missing.split(":")[0]


def test_a_rule_set_elsewhere_works_with_its_own_seeds_and_fixtures(lone_rules: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with (lone_rules / "ruleset.yaml").open("a") as manifest:
        manifest.write(f"seeds: {ROOT / 'seeds'}\nfixtures: [{tmp_path / 'fixtures' / 'fhir_fixtures'}]\n")
    code, out, _ = run(capsys, "lint", str(lone_rules))
    assert code == 0 and out.splitlines()[-1].startswith("ok: 3 rules"), out
    code, out, _ = run(capsys, "test", str(lone_rules))
    assert code == 0 and "3 passed, 0 failed" in out, out
    edit(lone_rules / RULE, "ebook#p1", "ebook#p99")  # the seeds are checked again
    code, out, _ = run(capsys, "lint", str(lone_rules))
    assert code == 1 and "no passage 'p99' in seed 'nejm-racial-disparities-ebook'" in out


@pytest.mark.parametrize(("where", "old", "new", "message"), [
    (RULE, "            intent: proposal\n", "            intent: proposl\n", "'proposl'"),
    (CASES, "        authoredOn: \"2026-03-02T01:00:00Z\"\n", "        authoredOnn: \"2026-03-02T01:00:00Z\"\n",
     "authoredOnn"),
    # fhir.resources' list for Observation.status ends with '+' (abridged): it had not been checked at all
    (CASES, "        status: final\n", "        status: finalised\n", "'finalised' is not a code of status (one of: "
     "registered, preliminary, final, amended, corrected, cancelled, entered-in-error, unknown) "
     "(did you mean 'final'?)"),
])
def test_fhir_in_rule_files_is_checked_like_a_server_would(rules_dir: Path, capsys: pytest.CaptureFixture[str],
                                                           where: Path, old: str, new: str, message: str) -> None:
    edit(rules_dir / where, old, new)
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 1 and any(message in line and "not valid FHIR R4" in line for line in out.splitlines()), out


def test_retired_rules_cases_only_warn(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (rules_dir / RULE).unlink()
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 0, out
    assert any(line.startswith("warning: ") and f"cases for '{TROPONIN}', which no rule file defines" in line
               for line in out.splitlines())


def test_nudges_test_one_rule_verbose_with_counts_that_add_up(rules_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    edit(rules_dir / CASES, "    hook: encounter-start\n",  # a call the service would refuse: the case cannot run
         "    hook: encounter-start\n    context: {encounterId: \"not an id!\"}\n")
    for argv in (["test", str(rules_dir), "--rule", TROPONIN, "-v"], ["test", str(rules_dir / CASES), "-v"],
                 ["test", str(rules_dir / RULE), "-v"]):
        code, out, _ = run(capsys, *argv)
        lines = [line for line in out.splitlines() if not line.startswith(("warning: ", "note: "))]
        assert code == 1 and lines[0] == f"FAIL {TROPONIN}: 4 case(s), tp=1 tn=2 fp=0 fn=0 differs=0 error=1", out
        assert sum(line.startswith(("  ok  ", "  FAIL")) for line in lines) == 4  # each case listed
        assert any("could not run" in line for line in lines)
        assert lines[-1] == "0 passed, 1 failed (4 case(s), 1 failing)"


@pytest.mark.parametrize(("where", "old", "new", "message"), [
    (RULE, "      within: 72h\n", "      withn: 72h\n", "unknown field 'withn' (did you mean 'within'?)"),
    (RULE, "card:\n  summary:", "card:\n  sumary:", "unknown field 'sumary' (did you mean 'summary'?)"),
    (RULE, "status: active", "status: actve", "(did you mean 'active'?)"),
    (CASES, "    expect: []\n", "    expected: []\n", "unknown field 'expected' (did you mean 'expect'?)"),
    (Path("valuesets/troponin.yaml"), "title:", "titel:", "unknown field 'titel' (did you mean 'title'?)"),
    (RULE, ".exists()\"", ".exsts()\"", "unknown FHIRPath function 'exsts()' (did you mean 'exists'?)"),
    (RULE, ".exists()\"", ".memberof('troponin')\"",
     "unknown FHIRPath function 'memberof()' (did you mean 'memberOf'?)"),
    # a variable that is never defined had linted clean, and the rule raised on every call
    (RULE, ".exists()\"", ".exists() and %encounterID.exists()\"",
     "%encounterID is not defined here (did you mean '%encounterId'?)"),
    (RULE, "where: \"(value", "where: \"%troponin.id = id or (value", "%troponin is not defined here"),
    (RULE, "      since: troponin\n", "      since: troponin\n      where: \"status = %finalStatus\"\n",
     "%finalStatus is not defined here: an expression reads %now"),
    # inside where(), which the load-time dry run on an empty resource never evaluates: it had linted clean
    (RULE, "      since: troponin\n",
     "      since: troponin\n      where: \"identifier.where(value = %resource.id).exists().not()\"\n",
     "%resource is not defined here"),
    # a misspelt element is always empty, never an error: the clause never held (or never blocked)
    (RULE, "(value as Quantity).value >", "(value as Quantity).valeu >",
     "'valeu' is not an element of Quantity (did you mean 'value'?) (FHIR R4)"),
    (RULE, "interpretation.coding.where(code", "interpretation.codng.where(code",
     "'codng' is not an element of CodeableConcept (did you mean 'coding'?)"),
    (RULE, "(value as Quantity)", "(value as Quantiy)", "'Quantiy' is not a FHIR R4 type (did you mean 'Quantity'?)"),
    (RULE, "      since: troponin\n", "      since: troponin\n      where: \"status = active\"\n",
     "'active' is not an element of ServiceRequest"),
    (RULE, "      since: troponin\n", "      since: troponin\n      where: \"%troponin.issud < authoredOn\"\n",
     "'issud' is not an element of Observation (did you mean 'issued'?)"),  # through a bound name
    # a quoted unit is UCUM's: 'days' is none, and the rule had raised on every call
    (RULE, "      since: troponin\n", "      since: troponin\n      where: \"authoredOn > %now - 2 'days'\"\n",
     "2 'days' cannot be added to or taken from a date: a quoted unit is a UCUM unit, and only 'wk', 'd', 'h', "
     "'min', 's' and 'ms' are times there; write the calendar duration `2 days`"),
])
def test_did_you_mean_for_fields_values_and_fhirpath_functions(rules_dir: Path, capsys: pytest.CaptureFixture[str],
                                                                where: Path, old: str, new: str, message: str) -> None:
    edit(rules_dir / where, old, new)
    code, out, _ = run(capsys, "lint", str(rules_dir))
    problems = [line for line in out.splitlines() if not line.startswith("warning: ")]
    assert code == 1 and any(message in line for line in problems), out
    assert not any("missing required field" in line for line in problems), out  # the typo, not its knock-on


@pytest.mark.parametrize("hook", ["patient-view", "encounter-start", "order-select", "order-sign", "appointment-book"])
def test_new_rule_lints_clean_and_its_two_cases_pass(rules_dir: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch, hook: str) -> None:
    monkeypatch.setenv("NUDGES_NOW", "2026-03-02T12:34:00Z")
    code, out, err = run(capsys, "new", "rule", "my-new-rule", "--hook", hook, "--area", "drafts",
                         "--rules", str(rules_dir))
    assert code == 0, out + err
    rule, cases = rules_dir / "drafts" / "my-new-rule.yaml", rules_dir / "drafts" / "my-new-rule.cases.yaml"
    assert rule.is_file() and cases.is_file() and (rules_dir / "valuesets" / "my-new-rule.yaml").is_file()
    assert "lint ok; PASS my-new-rule: 2 case(s), tp=1 tn=1" in out
    assert "now: \"2026-03-02T12:00:00Z\"" in cases.read_text()  # the pinned clock, to the hour
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 0, out
    warned = [line for line in out.splitlines() if "placeholder(s) from `nudges new rule`" in line]
    assert len(warned) == 2 and any("drafts/my-new-rule.yaml:" in line for line in warned)  # rule and value set
    code, out, _ = run(capsys, "test", str(rule), "-v")
    assert code == 0 and "2 case(s), tp=1 tn=1" in out and out.count("  ok  ") == 2
    # The author makes it active before filling in the placeholders: an error, not a warning.
    edit(rule, "status: experimental", "status: active")
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 1 and "an active rule keeps" in out


def test_new_rule_never_overwrites_and_checks_the_topic(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "new", "rule", TROPONIN, "--rules", str(rules_dir))
    assert code == 1 and "already exists" in err
    code, _, err = run(capsys, "new", "rule", "fresh-rule", "--topic", "acute-coronary", "--rules", str(rules_dir))
    assert code == 1 and "(did you mean 'acute-coronary-care'?)" in err
    assert not (rules_dir / "local").exists()
    code, _, err = run(capsys, "new", "rule", "fresh-rule", "--rules", str(rules_dir.parent))
    assert code == 1 and "no rule set at" in err


def test_nudges_test_says_what_is_missing(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "test", str(rules_dir / "cardiology" / "nowhere"))
    assert code == 1 and "no such file or folder" in err  # not a load of the current folder as a rule set
    code, _, err = run(capsys, "test", str(rules_dir), "--rule", "troponin")
    assert code == 1 and f"no rule 'troponin' in {rules_dir} (did you mean '{TROPONIN}'?)" in err
    (rules_dir / CASES).unlink()
    edit(rules_dir / RULE, "status: active", "status: experimental")
    code, out, _ = run(capsys, "test", str(rules_dir / RULE))
    assert code == 0 and f"NO CASES {TROPONIN}: write {TROPONIN}.cases.yaml" in out


def test_warnings_about_the_rest_of_the_set_are_one_line(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "test", str(rules_dir / RULE))
    assert code == 0 and not any(line.startswith("warning: ") for line in out.splitlines())
    assert out.splitlines()[0] == f"note: 4 lint warning(s) in the rule set (nudges lint {rules_dir} lists them)"
    edit(rules_dir / RULE, "owner: cardiology-informatics", "owner: REPLACE-me")  # a warning about this rule
    edit(rules_dir / RULE, "status: active", "status: experimental")
    code, out, _ = run(capsys, "test", str(rules_dir / RULE))
    lines = out.splitlines()
    assert lines[0].startswith("warning: ") and "placeholder(s) from `nudges new rule`" in lines[0]
    assert lines[1] == f"note: 4 other lint warning(s) in the rule set (nudges lint {rules_dir} lists them)"


def test_a_failing_case_names_the_explain_command(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(rules_dir / CASES, "valueQuantity: {value: 20, unit: ng/L}", "valueQuantity: {value: 200, unit: ng/L}")
    code, out, _ = run(capsys, "test", str(rules_dir), "--rule", TROPONIN)
    assert code == 1
    why = next(line for line in out.splitlines() if "why:" in line)
    assert why.endswith(f"nudges explain {rules_dir / CASES} --case \"near miss - value within this assay's "
                        "reference range\"")
    code, out, _ = run(capsys, "explain", str(rules_dir / CASES), "--case",
                       "near miss - value within this assay's reference range")
    assert code == 0 and f"{TROPONIN}: FIRED" in out


def test_a_rule_load_is_cached_by_content(rules_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsed YAML and FHIRPath trees are kept on disk by the hash of what was parsed: an unchanged set
    loads from the cache, an edited file is parsed again, and a damaged entry costs only speed."""
    from nudges.rules import cache
    from nudges.rules.compiler import load_ruleset

    monkeypatch.setenv("NUDGES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_memory", {})
    first = load_ruleset(rules_dir).ruleset
    entries = {p.name for p in (tmp_path / "cache").rglob("*.json")}
    assert first is not None and any(n.startswith("yaml-") for n in entries) and any(
        n.startswith("fhirpath-") for n in entries)
    monkeypatch.setattr(cache, "_memory", {})
    for entry in (tmp_path / "cache").rglob("yaml-*.json"):
        entry.write_text("{not json")  # damaged: parsed again
    again = load_ruleset(rules_dir).ruleset
    assert again is not None and again.digest == first.digest and [r.id for r in again.rules] == [
        r.id for r in first.rules]
    edit(rules_dir / RULE, "within: 72h", "within: 48h")
    edited = load_ruleset(rules_dir).ruleset
    assert edited is not None and edited.digest != first.digest
    rule = next(r for r in edited.rules if r.id == TROPONIN)
    assert str(rule.all[0].within) == "2 days, 0:00:00"  # type: ignore[union-attr]  # the edit, not the cache


def test_a_files_positions_are_parsed_once_per_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Placing a warning needs the round-trip tree; a reload of the same text reuses it (a rule set with
    warnings had each load parse those files again), an edited text is parsed afresh, and a file with a
    syntax error is reported at each load, never remembered."""
    from nudges.rules import cache, yamlfiles

    monkeypatch.setenv("NUDGES_CACHE_DIR", "")
    monkeypatch.setattr(cache, "_memory", {})
    monkeypatch.setattr(yamlfiles, "_TREES", {})
    parsed: list[str] = []
    real = yamlfiles._parse

    def counted(text: str) -> object:
        parsed.append(text)
        return real(text)

    monkeypatch.setattr(yamlfiles, "_parse", counted)
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\nb:\n  c: 2\n")
    for _ in range(3):
        document, problems = yamlfiles.load(path, "x.yaml")
        assert document is not None and not problems
        assert yamlfiles.position(document, ("b", "c"), value=True) == (3, 6)
    assert len(parsed) == 1
    path.write_text("a: 1\nb:\n  d: 2\n")
    document, _ = yamlfiles.load(path, "x.yaml")
    assert document is not None and yamlfiles.position(document, ("b", "d")) == (3, 3) and len(parsed) == 2
    path.write_text("a: [1\n")
    for _ in range(2):
        assert yamlfiles.load(path, "x.yaml")[0] is None
    assert len(parsed) == 4


def test_files_too_large_to_read_or_expand_are_refused_quickly(rules_dir: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A few hundred bytes of nested YAML aliases (each anchor ten times the one before) had lint, and each
    reload of the service, expand them for minutes; a file of many megabytes held every reload; a file in
    another encoding said only where its first bad byte was, in bytes."""
    import time

    from nudges.rules import yamlfiles

    bomb = rules_dir / "local" / "bomb.yaml"
    bomb.parent.mkdir(exist_ok=True)
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(levels) + "\nfalsepositives: *a8\n")
    start = time.monotonic()
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 1 and "bomb.yaml:1:1: the file expands to more than 250,000 values" in out, out
    assert time.monotonic() - start < 30
    bomb.unlink()
    monkeypatch.setattr(yamlfiles, "MAX_FILE_BYTES", 2**20)
    (rules_dir / "local" / "huge.yaml").write_text("notes: |\n" + "  x\n" * 2**19)
    (rules_dir / "local" / "latin.yaml").write_bytes("id: a\ntitle: caf\u00e9\n".encode("cp1252"))
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 1 and "huge.yaml:1:1: the file is 2.0 MB, over the 1 MB" in out, out
    assert "latin.yaml:2:1: the file is not UTF-8 text" in out and "save it as UTF-8" in out, out


@pytest.mark.parametrize(("old", "new", "message"), [
    # a case on a hook the rule is never served on had run (and counted towards "a firing and a quiet case")
    ("  - name: near miss - value within this assay's reference range\n    hook: encounter-start\n",
     "  - name: near miss - value within this assay's reference range\n    hook: order-sign\n",
     "case 'near miss - value within this assay's reference range' calls order-sign, a hook "
     "troponin-without-cath-plan is not served on (hooks: patient-view, encounter-start, encounter-discharge)"),
    ("  - name: near miss - result only 2 h old, still inside the window\n",
     "  - name: elevated hs-troponin 14 h ago, nothing ordered\n",
     "case name 'elevated hs-troponin 14 h ago, nothing ordered' is also case 1's"),
    ("    hook: patient-view\n", "    hook: patient-view\n    now: \"yesterday\"\n",
     "'yesterday' is not an ISO 8601 instant: write it as 2026-03-02T12:00:00Z"),
])
def test_cases_lint_against_their_rule(rules_dir: Path, capsys: pytest.CaptureFixture[str], old: str, new: str,
                                       message: str) -> None:
    edit(rules_dir / CASES, old, new)
    code, out, _ = run(capsys, "lint", str(rules_dir))
    line = max(i for i, text in enumerate((rules_dir / CASES).read_text().splitlines(), 1)
               if new.splitlines()[-1] in text)
    assert code == 1 and any(message in p and f"cases.yaml:{line}:" in p for p in out.splitlines()), out


@pytest.mark.parametrize(("where", "old", "new", "cause", "knock_on"), [
    (RULE, "status: active", "statuss: active", "unknown field 'statuss'", "which no rule file defines"),
    (CASES, "    expect: []\n", "    expected: []\n", "unknown field 'expected'", "needs at least one firing"),
])
def test_a_refused_file_is_the_one_problem_not_its_knock_ons(rules_dir: Path, capsys: pytest.CaptureFixture[str],
                                                             where: Path, old: str, new: str, cause: str,
                                                             knock_on: str) -> None:
    """A rule file refused had also made its cases "cases for a rule no file defines (delete this file?)",
    and a cases file refused its rule "an active rule needs a firing and a non-firing case"."""
    edit(rules_dir / where, old, new)
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 1 and cause in out and knock_on not in out, out


def test_an_active_rule_may_not_keep_the_scaffolds_example_codes(rules_dir: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The scaffold's REPLACE marks in the rule file stopped an active rule, but its value set's example
    code (urn:nudges:replace-me) and its cases' placeholders were only warned about: it would be served."""
    code, _, _ = run(capsys, "new", "rule", "half-done", "--area", "drafts", "--rules", str(rules_dir))
    assert code == 0
    rule = rules_dir / "drafts" / "half-done.yaml"
    text = rule.read_text().replace("status: experimental", "status: active", 1)
    rule.write_text(re.sub(r"REPLACE[\w-]*", "filled", text))  # the rule file's own marks filled in
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 1 and "matches codes that are the scaffold's example (urn:nudges:replace-me)" in out, out
    assert "half-done.cases.yaml" in out and "the cases of an active rule keep" in out, out


@pytest.mark.parametrize(("old", "new", "message"), [
    ("version: 1.0.0", "version: 1.0", 'version: Input should be a valid string: YAML read 1.0 as a number; write the '
                                       'version as three numbers in quotes, "1.0.0"'),
    ("version: 1.0.0", "version: banana", 'a version is three numbers, major.minor.patch, as in "1.0.0"'),
    ("      within: 72h\n", "      within: 72\n", "YAML read 72 as a number; give the unit, as in 72d, 12h"),
    ("hooks: [patient-view, encounter-start, encounter-discharge]", "hooks: patient-view",
     "write it as a list, [patient-view]"),
    ("hooks: [patient-view, encounter-start, encounter-discharge]", "hooks: [patient-view, patient-view]",
     "patient-view listed twice: name each hook once"),
])
def test_schema_errors_say_what_to_write(rules_dir: Path, capsys: pytest.CaptureFixture[str], old: str, new: str,
                                         message: str) -> None:
    """pydantic's words alone ("Input should be a valid string") left an author to guess that YAML had read
    `1.0` as a number."""
    edit(rules_dir / RULE, old, new)
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 1 and message in out, out


def test_a_misspelt_resource_type_or_topic_gets_did_you_mean_and_no_knock_on(
        rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(rules_dir / RULE, "      resource: Observation\n", "      resource: Observaton\n")
    topic = next(line for line in (rules_dir / RULE).read_text().splitlines() if line.startswith("topic: "))
    edit(rules_dir / RULE, topic, topic[:-2])
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 1 and "'Observaton' is not a FHIR R4 resource type (did you mean 'Observation'?)" in out, out
    assert f"topic '{topic[7:-2]}' is not listed in ruleset.yaml topics (did you mean '{topic[7:]}'?)" in out, out
    assert "has no indexed code element" not in out  # the type is unknown: said once


def test_new_rule_goes_where_nudges_rules_points(rules_dir: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every other command reads NUDGES_RULES; `nudges new rule` wrote into ./rules whatever it said."""
    monkeypatch.setenv("NUDGES_RULES", str(rules_dir))
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "new", "rule", "env-placed", "--area", "drafts")
    assert code == 0, out + err
    assert (rules_dir / "drafts" / "env-placed.yaml").is_file() and not (tmp_path / "rules").exists()


def test_a_value_set_date_must_be_a_day(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rules_dir / "valuesets" / "troponin.yaml"
    path.write_text(path.read_text().replace("title:", "date: \"2026-13-45\"\ntitle:", 1))
    code, out, _ = run(capsys, "lint", str(rules_dir))
    assert code == 1 and "'2026-13-45' is not a day of the calendar: write it as YYYY-MM-DD" in out, out


@pytest.mark.parametrize("style", [">-", "|"])
def test_an_error_inside_a_block_expression_is_marked_on_its_own_line(rules_dir: Path, style: str,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Most shipped rules write `where: >-` over several lines: an error was put on the `where:` line at
    the column it had in the joined text (13:80 for one at 16:35), and the console marked that line."""
    old = ("      where: \"(value as Quantity).value > referenceRange.high.value or interpretation.coding.where("
           "code = 'H' or code = 'HH' or code = 'A').exists()\"\n")
    new = (f"      where: {style}\n        (value as Quantity).value > referenceRange.high.value\n"
           "        or interpretation.codng.where(code = 'H' or code = 'HH' or code = 'A').exists()\n")
    edit(rules_dir / RULE, old, new)
    code, out, _ = run(capsys, "lint", str(rules_dir))
    line = next(i for i, text in enumerate((rules_dir / RULE).read_text().splitlines(), 1) if "codng" in text)
    assert code == 1 and f"{RULE.name}:{line}:27: 'codng' is not an element of CodeableConcept" in out, out
