"""The README's shell examples marked `<!-- readme-test -->` run as written and print what it shows.

Each marked ```bash block runs in bash in a temporary copy of the repository's rules, seeds and fixtures
(so an example that writes files writes there), with `nudges` on PATH, the clock pinned and port 8080
replaced by a free one; background jobs are stopped at the end. Its output is compared with the next
fenced block: in text, a line that ends with `…` matches any line with that beginning and a line that is
only `…` any number of lines; in JSON, `"…"` stands for any value (and, as a key, for keys left out) and
a string ending in `…` for any string with that beginning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- readme-test -->"
ELLIPSIS = "…"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Example:
    line: int
    command: str
    expected: str
    kind: str  # json or text

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def examples() -> list[Example]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = []
    for mark in re.finditer(re.escape(MARK), text):
        blocks = FENCE.finditer(text, mark.end())
        command, output = next(blocks), next(blocks)
        assert command.group(1) == "bash", f"README.md:{text.count(chr(10), 0, mark.start()) + 1}: not bash"
        found.append(Example(text.count("\n", 0, mark.start()) + 1, command.group(2), output.group(2),
                             "json" if output.group(1) == "json" else "text"))
    return found


def lines_match(expected: list[str], actual: list[str]) -> bool:
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head == ELLIPSIS:
        return any(lines_match(rest, actual[i:]) for i in range(len(actual) + 1))
    if not actual:
        return False
    same = actual[0].startswith(head[:-1]) if head.endswith(ELLIPSIS) else actual[0].rstrip() == head.rstrip()
    return same and lines_match(rest, actual[1:])


def json_match(expected: Any, actual: Any) -> bool:
    if expected == ELLIPSIS:
        return True
    if isinstance(expected, str) and expected.endswith(ELLIPSIS):
        return isinstance(actual, str) and actual.startswith(expected[:-1])
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return False
        keys = set(expected) - {ELLIPSIS}
        if ELLIPSIS not in expected and set(actual) != keys:
            return False
        return keys <= set(actual) and all(json_match(expected[k], actual[k]) for k in keys)
    if isinstance(expected, list):
        if expected and expected[-1] == ELLIPSIS:
            return isinstance(actual, list) and len(actual) >= len(expected) - 1 and all(
                json_match(e, a) for e, a in zip(expected[:-1], actual, strict=False))
        return isinstance(actual, list) and len(actual) == len(expected) and all(
            json_match(e, a) for e, a in zip(expected, actual, strict=True))
    return bool(expected == actual)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(example: Example, base: Path) -> subprocess.CompletedProcess[str]:
    """One example in its own copy of what the examples read (`.venv/bin/nudges` where the quick start puts
    it), so examples that write files cannot disturb each other."""
    for folder in ("rules", "seeds", "fhir_fixtures"):
        shutil.copytree(ROOT / folder, base / folder)
    (base / ".venv").mkdir()
    (base / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    port = str(free_port())
    script = "set -e\ntrap 'status=$?; jobs -p | xargs -r kill 2>/dev/null; wait; exit $status' EXIT\n" + \
        example.command.replace("8080", port)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "NUDGES_NOW": "2026-03-02T12:00:00Z", "NUDGES_PORT": port, "NUDGES_DATABASE_URL":
           f"sqlite:///{base}/nudges.db", "NUDGES_FOLLOWUP_POLL_SECONDS": "0"}
    env.pop("NUDGES_RULES", None)
    return subprocess.run(["bash", "-c", script], cwd=base, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[Example, subprocess.CompletedProcess[str]]:
    """Every example at once (most of their time is a process starting and waiting for a server)."""
    found = examples()
    bases = [tmp_path_factory.mktemp("readme") for _ in found]  # here: pytest's mktemp is not thread-safe
    with ThreadPoolExecutor(max_workers=len(found)) as pool:
        done = pool.map(run, found, bases)
        return dict(zip(found, done, strict=True))


def test_the_readme_has_tested_examples() -> None:
    assert len(examples()) >= 4


@pytest.mark.parametrize("example", examples(), ids=str)
def test_readme_example_prints_what_the_readme_shows(
        example: Example, outcomes: dict[Example, subprocess.CompletedProcess[str]]) -> None:
    done = outcomes[example]
    assert done.returncode == 0, f"{example}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    if example.kind == "json":
        matched = json_match(json.loads(example.expected), json.loads(done.stdout))
    else:
        matched = lines_match(example.expected.splitlines(), done.stdout.splitlines())
    assert matched, f"{example}: the output is not what the README shows; it printed:\n{done.stdout}"


@pytest.mark.parametrize(("expected", "actual", "same"), [
    (["a …", "…", "z"], ["a b", "x", "y", "z"], True),
    (["a …", "z"], ["a b", "x", "z"], False),
    (["exact"], ["exact", "more"], False),
])
def test_text_matching(expected: list[str], actual: list[str], same: bool) -> None:
    assert lines_match(expected, actual) is same


@pytest.mark.parametrize(("expected", "actual", "same"), [
    ({"a": "…", "b": "x…"}, {"a": [1], "b": "xyz"}, True),
    ({"a": 1}, {"a": 1, "b": 2}, False),
    ({"a": 1, "…": "…"}, {"a": 1, "b": 2}, True),
    ([1, "…"], [1, 2, 3], True),
    ([1, 2], [1, 3], False),
])
def test_json_matching(expected: Any, actual: Any, same: bool) -> None:
    assert json_match(expected, actual) is same
