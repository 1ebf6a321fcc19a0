"""The folders a rule set reads besides its rule files: the fixtures its cases' `bundle:` paths name and the
seeds its `seed:` citations are checked against, and what lint says when they are not where
ruleset.yaml says (once, at ruleset.yaml, before the knock-on errors)."""

from __future__ import annotations

import re
from pathlib import Path

from . import cache, yamlfiles
from .compiled import CompiledRule
from .schema import PLACEHOLDER_MARKS, Cases
from .yamlfiles import Problem


def display(path: Path) -> str:
    """A path as problems name it: relative to the working folder when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_cases(path: Path, document: yamlfiles.Document, cases: Cases,
                fixture_dirs: tuple[Path, ...]) -> list[Problem]:
    """Cases must run: every `bundle:` found (saying where it was looked for), every inline resource valid
    FHIR R4 with codes from required bindings. A clean verdict is cached with the file's content."""
    from .resources import check

    problems = []
    for i, case in enumerate(cases.cases):
        if case.bundle:
            try:
                find_file(path.parent, case.bundle, fixture_dirs)
            except FileNotFoundError as exc:
                where = yamlfiles.position(document, ("cases", i, "bundle"), value=True)
                problems.append(Problem(display(path), *where, str(exc)))
    entry = cache.key("cases-clean", path.read_bytes())
    if cache.lookup(entry) is True:
        return problems
    found = []
    for i, case in enumerate(cases.cases):
        for part in ("resources", "draft_orders", "appointments"):
            for j, resource in enumerate(getattr(case, part)):
                for problem in check(resource):
                    loc = ("cases", i, part, j, *problem.location)
                    found.append(Problem(display(path), *yamlfiles.position(document, loc),
                                         f"case '{case.name}': {part}[{j}] is not valid FHIR R4: {problem.message}"))
    if not found:
        cache.store(entry, True)
    return problems + found


def missing_folders(manifest_path: Path, document: yamlfiles.Document | None, seeds_dir: Path, unchecked: list[str],
                     fixture_dirs: tuple[Path, ...], problems: list[Problem]) -> list[Problem]:
    """The root causes of a rule set copied away from its folders, said once at ruleset.yaml: no seeds folder
    (instead of an error at every `seed:` citation), a fixtures folder that does not exist (before the
    bundles not found in it)."""
    found = []
    show = display(manifest_path)
    if unchecked:
        found.append(Problem(show, *(yamlfiles.position(document, ("seeds",)) if document else (1, 1)),
                             f"no seeds folder at {seeds_dir}, so the `seed:` citations of {len(unchecked)} rule(s) "
                             f"({', '.join(sorted(unchecked)[:3])}{', ...' if len(unchecked) > 3 else ''}) cannot be "
                             "checked: copy the seeds folder beside the rules folder, or set `seeds:` in ruleset.yaml"))
    if any(" not found in " in p.message and p.message.startswith("bundle ") for p in problems):
        for i, folder in enumerate(fixture_dirs):
            if not folder.is_dir():
                found.append(Problem(show, *(yamlfiles.position(document, ("fixtures", i), value=True) if document
                                             else (1, 1)),
                                     f"fixtures folder {folder} does not exist, and cases' bundles were looked for "
                                     "there: copy it beside the rules folder, or set `fixtures:` in ruleset.yaml"))
    return found


def seed_passages(seeds_dir: Path) -> dict[str, set[str]] | None:
    """Record id -> passage ids from seeds/*.yaml, or None when there is no seeds folder to check."""
    if not seeds_dir.is_dir():
        return None
    found: dict[str, set[str]] = {}
    for path in seeds_dir.glob("*.yaml"):
        document, _ = yamlfiles.load(path, str(path))
        data = document.plain if document is not None else None
        if isinstance(data, dict) and "id" in data:
            passages = data.get("passages") or []
            found[str(data["id"])] = {str(p.get("id")) for p in passages if isinstance(p, dict)}
    return found


def find_file(start: Path, relative: str, also: tuple[Path, ...] = ()) -> Path:
    """A fixture path is looked up relative to the cases file's folder, then each parent folder, then the
    rule set's fixture folders (`fixtures:` in ruleset.yaml); the error says where it looked."""
    parts = Path(relative).parts
    for folder in (start, *start.parents, *also):
        candidate = folder / relative
        if candidate.is_file():
            return candidate
    for folder in also:  # `fhir_fixtures/patients/x.json` in a fixtures folder that is itself fhir_fixtures/
        if len(parts) > 1 and parts[0] == folder.name and (folder.joinpath(*parts[1:])).is_file():
            return folder.joinpath(*parts[1:])
    places = [f"{start} and its parents", *(str(p) for p in also)]
    raise FileNotFoundError(f"bundle '{relative}' not found in {', '.join(places)}: add the folder that holds it "
                            "to `fixtures:` in ruleset.yaml, or give a path relative to this file")


def placeholders(text: str) -> tuple[int, int, int] | None:
    """Line and column of the first placeholder `nudges new rule` left in a file, and how many lines hold one."""
    found = [(n, min(i for i in (line.find(m) for m in PLACEHOLDER_MARKS) if i >= 0) + 1)
             for n, line in enumerate(text.splitlines(), 1) if any(m in line for m in PLACEHOLDER_MARKS)
             and not line.lstrip().startswith("#")]
    return (*found[0], len(found)) if found else None


def scaffold_left(rule: CompiledRule, shown: str, document: yamlfiles.Document,
                   cases: tuple[Path, yamlfiles.Document, Cases] | None) -> list[Problem]:
    """An active rule is served: its value sets and cases may no more keep the scaffold's example code
    (`urn:nudges:replace-me|…`) than its own file may (a warning there let it be served matching nothing)."""
    found = []
    for i, clause in enumerate(rule.clauses()):
        if clause.codes and any("replace-me" in system for system, _ in clause.codes):
            found.append(Problem(shown, *yamlfiles.position(document, ("when",)), f"an active rule's clause {i + 1} "
                                 f"({clause.resource}) matches codes that are the scaffold's example "
                                 "(urn:nudges:replace-me): put the real codes in its value set first"))
    left = placeholders(cases[1].text) if cases is not None else None
    if cases is not None and left is not None:
        found.append(Problem(display(cases[0]), left[0], left[1], f"the cases of an active rule keep {left[2]} "
                             "placeholder(s) from `nudges new rule` (REPLACE, replace-me): fill them in first"))
    return found


def case_names(path: Path, document: yamlfiles.Document, cases: Cases) -> list[Problem]:
    """A case is named in `nudges test` output and picked by `--case NAME`: two of one name are one too many."""
    seen: dict[str, int] = {}
    found = []
    for i, case in enumerate(cases.cases):
        if case.name in seen:
            found.append(Problem(display(path), *yamlfiles.position(document, ("cases", i, "name"), value=True),
                                 f"case name '{case.name}' is also case {seen[case.name] + 1}'s: name each case apart"))
        seen.setdefault(case.name, i)
    return found


BARE_MINUTES = re.compile(r":\s+(\d+)\s*m\s*(?=$|[,}\]#])")


def bare_minutes(shown: str, text: str) -> list[Problem]:
    """`6m` means six minutes, and an author thinking of months gets a window that almost never matches,
    silently. So a bare `m` is worth a warning that says which it is (read from the text: parsing the
    file's positions for every load would cost more than the check)."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for match in BARE_MINUTES.finditer(line):
            amount = match.group(1)
            found.append(Problem(shown, n, match.start(1) + 1, f"'{amount}m' is {amount} minutes: write "
                                 f"'{amount}min' to say so, or '{amount}mo' for months (30 days each)"))
    return found
