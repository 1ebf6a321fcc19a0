"""Loading a rule set for a command-line tool: problems printed as path:line:column, nothing served."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from ..rules.compiled import RuleSet
from ..rules.compiler import load_ruleset
from ..services import Services
from .progress import Progress


def load_or_report(directory: Path, err: TextIO, site: Path | None = None,
                   focus: Iterable[str] = ()) -> RuleSet | None:
    """The rule set, or None after printing every problem. Warnings about the files of the rules in `focus`
    (the ones a command was asked about) are printed in full, the others counted in one line, so a run
    of one rule's cases is not buried under warnings about the rest of the set. A slow load (nothing
    cached yet, a large set) shows its progress on a terminal."""
    progress = Progress(0, "steps", sys.stderr, prefix="loading rules ")
    result = load_ruleset(directory, site, progress=progress)
    progress.finish()
    for problem in result.problems:
        err.write(f"{problem}\n")
    names = set(focus)
    mine = [w for w in result.warnings if Path(w.path).name.split(".")[0] in names]
    for warning in mine:
        err.write(f"warning: {warning}\n")
    others = len(result.warnings) - len(mine)
    if others:
        err.write(f"note: {others} {'other ' if mine else ''}lint warning(s) in the rule set "
                  f"(nudges lint {directory} lists them)\n")
    if result.ruleset is None:
        err.write(f"{len(result.problems)} problem(s) in the rule set in {directory}\n")
    return result.ruleset


def load_services(directory: Path, statuses: Iterable[str], err: TextIO, site: Path | None = None) -> Services | None:
    ruleset = load_or_report(directory, err, site)
    return None if ruleset is None else Services.build(ruleset, frozenset(statuses))
