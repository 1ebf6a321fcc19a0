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


def load_or_report(directory: Path, err: TextIO, site: Path | None = None) -> RuleSet | None:
    """The rule set, or None after printing every problem (and, either way, every warning). A slow load
    (nothing cached yet, a large set) shows its progress on a terminal."""
    progress = Progress(0, "steps", sys.stderr, prefix="loading rules ")
    result = load_ruleset(directory, site, progress)
    progress.finish()
    for problem in result.problems:
        err.write(f"{problem}\n")
    for warning in result.warnings[:3]:
        err.write(f"warning: {warning}\n")
    if len(result.warnings) > 3:
        err.write(f"warning: ... and {len(result.warnings) - 3} more (nudges lint {directory} lists them)\n")
    if result.ruleset is None:
        err.write(f"{len(result.problems)} problem(s) in the rule set in {directory}\n")
    return result.ruleset


def load_services(directory: Path, statuses: Iterable[str], err: TextIO, site: Path | None = None) -> Services | None:
    ruleset = load_or_report(directory, err, site)
    return None if ruleset is None else Services.build(ruleset, frozenset(statuses))
