"""Progress of long command-line work: drawn on a terminal (a real pseudo-terminal here), never in output
that is piped or captured, and told about every step of a load, a case run and a replay."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from nudges.rules.compiler import load_ruleset
from nudges.tools.cases import run_all
from nudges.tools.progress import Progress


def read_all(master: int) -> str:
    """Everything written to the terminal so far (a pseudo-terminal hands it over in pieces)."""
    chunks = []
    while select.select([master], [], [], 0.5)[0]:
        chunks.append(os.read(master, 65536))
    return b"".join(chunks).decode()


def drawn_on_a_terminal(steps: int, **options: object) -> str:
    master, slave = pty.openpty()
    try:
        with open(slave, "w", encoding="utf-8", closefd=False) as terminal:
            progress = Progress(steps, "rules tested", terminal, delay=0, **options)  # type: ignore[arg-type]
            for done in range(1, steps + 1):
                progress.step(done)
            progress.finish()
        return read_all(master)
    finally:
        os.close(master)
        os.close(slave)


def test_a_terminal_sees_a_bar_that_is_wiped_at_the_end() -> None:
    shown = drawn_on_a_terminal(4)
    assert "\r[" in shown and "100% 4/4 rules tested" in shown and " 25% 1/4" in shown
    assert shown.endswith("\r\x1b[K")  # nothing left behind on the line


def test_nothing_is_written_where_no_one_watches() -> None:
    quiet = io.StringIO()
    progress = Progress(4, "rules tested", quiet, delay=0)
    for done in range(1, 5):
        progress.step(done)
    progress.finish()
    assert quiet.getvalue() == ""
    plain = io.StringIO()  # a long screen's log asks for plain lines
    progress = Progress(20, "patients", plain, delay=0, plain=True, prefix="replay: ")
    for done in range(1, 21):
        progress.step(done)
    assert plain.getvalue().splitlines() == [f"replay: {n}/20 patients" for n in range(2, 21, 2)]


def test_a_quick_run_draws_nothing_even_on_a_terminal() -> None:
    assert drawn_on_a_terminal(3, plain=False) != ""
    master, slave = pty.openpty()
    try:
        with open(slave, "w", encoding="utf-8", closefd=False) as terminal:
            progress = Progress(3, "files", terminal)  # the default delay: a cached load is over before it
            progress.step(1)
            progress.finish()
        os.write(slave, b".")
        assert read_all(master) == "."
    finally:
        os.close(master)
        os.close(slave)


def test_loads_and_case_runs_report_every_step(rules_dir: Path) -> None:
    heard: list[tuple[int, int]] = []
    result = load_ruleset(rules_dir, progress=lambda done, total: heard.append((done, total)))
    assert result.ruleset is not None
    files, rules, cases = 11, 3, 3
    assert heard[-1] == (files + rules + cases, files + rules + cases)
    assert [done for done, _ in heard] == list(range(1, len(heard) + 1))
    ran: list[tuple[int, int]] = []
    run_all(result.ruleset, None, lambda done, total: ran.append((done, total)))
    assert ran == [(1, 3), (2, 3), (3, 3)]


def test_piped_output_has_no_progress_in_it() -> None:
    done = subprocess.run([sys.executable, "-m", "nudges", "test", str(ROOT / "tests" / "rules")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "\r" not in done.stdout + done.stderr and "\x1b[" not in done.stdout + done.stderr
