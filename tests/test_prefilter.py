"""The `text:` prefilter (nudges/prefilter.py) never rules out a text its pattern matches: on the shipped
patterns and every string in the shipped cases and fixtures, and on random patterns and texts."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from nudges.prefilter import lowered, may_match, needles
from nudges.rules.compiler import load_ruleset
from nudges.services import Services

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("pattern", "expected"), [
    ("colonoscop|sigmoidoscop", ("colonoscop", "sigmoidoscop")),
    (r"\bAMA\b|\bLWBS\b", ("ama", "lwbs")),
    ("against (medical )?advice", ("against ",)),  # the longer of the two runs every match passes through
    ("dna[^a-z]{0,3}fit", ("dna",)),
    ("(?x) left \\s+ without", ("without",)),  # verbose: the spaces are not part of the pattern
    ("(?:abc)+x", ("abc",)),
    ("(colon|rectal)[a-z ]{0,12}(cancer|\\bca\\b)", ("colon", "rectal")),
    ("Überweisung|referral", ("berweisung", "referral")),  # a non-ASCII letter ends a run
    (r"(\w+) \1", (" ",)),
    ("(a|b)c?", None),  # a class and an optional part require nothing
    ("x?|y", None),  # nor does a branch that can match nothing
    ("", None),
])
def test_needles_are_what_every_match_passes_through(pattern: str, expected: tuple[str, ...] | None) -> None:
    assert needles(re.compile(pattern, re.IGNORECASE)) == expected


def test_only_ascii_texts_are_judged() -> None:
    """Under IGNORECASE an ASCII letter matches the Kelvin sign and the long s: such texts are searched."""
    pattern = re.compile("kit|fits", re.IGNORECASE)
    found = needles(pattern)
    assert found == ("fits", "kit")
    for text in ("\u212aIT", "FIT\u017f"):  # KIT with a Kelvin sign; FITS with a long s
        assert pattern.search(text) and lowered(["Stool test", text]) is None and may_match(found, None)
    assert not may_match(found, lowered(["Fecal immunochemical", "Stool"]))
    assert may_match(found, lowered(["Stool", "Home FIT KIT given"]))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def shipped() -> tuple[list[re.Pattern[str]], list[str]]:
    """Every `text:` pattern of the shipped rules, and every string of their cases and of the fixtures."""
    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    services = Services.build(ruleset, frozenset({"active", "test", "experimental"}))
    patterns = {c.text for s in services.by_id.values() for r in s.rules for c in r.clauses() if c.text is not None}
    found: set[str] = set()
    for _, cases in ruleset.cases.values():
        found.update(_strings(cases.model_dump()))
    for path in sorted((ROOT / "fhir_fixtures").rglob("*.json")):
        found.update(_strings(orjson.loads(path.read_bytes())))
    return sorted(patterns, key=lambda p: p.pattern), sorted(found)


def _wording(text: str) -> bool:
    """Text a clinician or a terminology wrote, not an id, a code, a date or an address (the search of every
    shipped pattern in every string of the fixtures took most of this file's time)."""
    return len(text) <= 300 and "://" not in text and any(c.isalpha() for c in text) and (
        " " in text or not any(c.isdigit() for c in text))


def test_shipped_patterns_on_shipped_texts_lose_no_match() -> None:
    patterns, texts = shipped()
    variants = sorted({v for t in texts if _wording(t) for v in (t, t.upper())})
    judged = matched = 0
    for pattern in patterns:
        found = needles(pattern)
        if found is None:
            continue
        judged += 1
        for text in variants:
            if pattern.search(text):
                matched += 1
                assert may_match(found, lowered([text])), (pattern.pattern, text)
    assert judged >= len(patterns) * 3 // 4 and matched > 200  # most shipped patterns are prefiltered, and match


ALPHABET = ["a", "b", "c", "A", "B", " ", "-", "é", "\u212a", "\u017f", "k", "s"]


def _random_pattern(rng: random.Random, depth: int = 0) -> str:
    choice = rng.randrange(9 if depth < 3 else 4)
    if choice <= 1:
        return "".join(re.escape(rng.choice(ALPHABET)) for _ in range(rng.randint(1, 4)))
    if choice == 2:
        return rng.choice(["[ab]", "[^a]", ".", r"\w", r"\s", r"\b", "[a-c]"])
    if choice == 3:
        return re.escape(rng.choice(ALPHABET))
    if choice == 4:
        return "|".join(_random_pattern(rng, depth + 1) for _ in range(rng.randint(2, 3)))
    if choice == 5:
        return f"(?:{_random_pattern(rng, depth + 1)})" + rng.choice(["", "?", "*", "+", "{0,2}", "{1,3}", "{2}"])
    if choice == 6:
        return f"({_random_pattern(rng, depth + 1)})"
    if choice == 7:
        return rng.choice(["(?=", "(?!", "(?<="]) + re.escape(rng.choice("abc")) + ")"
    return _random_pattern(rng, depth + 1) + _random_pattern(rng, depth + 1)


def test_random_patterns_on_random_texts_lose_no_match() -> None:
    rng = random.Random(20261202)
    checked = 0
    for _ in range(1500):
        source = _random_pattern(rng)
        try:
            pattern = re.compile(source, rng.choice([re.IGNORECASE, 0]))
        except re.error:
            continue
        found = needles(pattern)
        if found is None:
            continue
        for _ in range(40):
            text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))
            if pattern.search(text):
                checked += 1
                assert may_match(found, lowered(["b", text])), (source, text, found)
    assert checked > 1000
