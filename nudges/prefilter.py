"""What any match of a `text:` pattern must contain: a few plain strings, checked before the regex runs.

A `text:` clause searches every kept resource of its type in its time window, and after the day's rule
reviews those patterns are long case-insensitive alternations of local wording ("colonoscop|sigmoidoscop|
fecal immunochem|…"). Python's regex engine has no literal-prefix scan for such a pattern: it tries a
match at every position of every text, and in a 50-resource hook call that was an eighth of all the
instructions (callgrind), for results that are nearly always "no". Every match of the pattern contains
one of the strings found here, so a resource whose texts (lowered and joined once per call) contain none
of them (a substring test each, in C) cannot match and is not searched; any other is searched as before.
The answers are the same (tests/test_prefilter.py checks the shipped patterns on every string of the
shipped cases and fixtures, and random patterns on random texts).

The strings come from the parsed pattern: a run of plain ASCII characters that every match passes through,
or, for an alternation, one such run from each branch. Only ASCII texts are judged, compared lowered:
for ASCII, lowering and IGNORECASE agree, while a case-insensitive ASCII letter can match a non-ASCII one
(the Kelvin sign, the long s). Anything the parse does not show plainly (classes, optional parts,
look-arounds, back-references, a parser this Python does not have) gives no strings, and the pattern is
simply always searched.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Iterable
from typing import Any

_sre: Any = None
_parse: Any = None
with contextlib.suppress(ImportError):  # the re module's own parser (3.11+, private); else none prefiltered
    _sre, _parse = importlib.import_module("re._constants"), importlib.import_module("re._parser")

Needles = tuple[str, ...]
_KNOWN: dict[re.Pattern[str], Needles | None] = {}  # one entry per distinct pattern text ever asked about
# The same by the pattern object's id, the object kept alive beside its answer (so the id is never reused):
# a compiled pattern hashes its whole compiled program on every look-up, and a rule's alternation of local
# wordings is a long one, asked about for every clause of every call.
_BY_ID: dict[int, tuple[re.Pattern[str], Needles | None]] = {}


def needles(pattern: re.Pattern[str]) -> Needles | None:
    """Lowercase strings one of which is in every text the pattern matches (ASCII texts, compared lowered),
    or None when no such set is known. Worked out once per pattern."""
    known = _BY_ID.get(id(pattern))
    if known is not None:
        return known[1]
    found = _needles(pattern)
    if len(_BY_ID) < 65_536:  # patterns come from rule sets: a bound, not an eviction policy
        _BY_ID[id(pattern)] = (pattern, found)
    return found


def _needles(pattern: re.Pattern[str]) -> Needles | None:
    if pattern in _KNOWN:
        return _KNOWN[pattern]
    found: Needles | None = None
    try:
        if _parse is not None:
            required = _sequence(_parse.parse(pattern.pattern, pattern.flags).data)
            if required and all(required):
                found = tuple(sorted(required))
    except Exception:  # a pattern the parser reads differently: search it every time
        found = None
    _KNOWN[pattern] = found
    return found


def may_match(found: Needles, lowered: str | None) -> bool:
    """Whether texts (`lowered`, or None when one of them is not ASCII) can match a pattern with these needles."""
    if lowered is None:
        return True
    for needle in found:  # noqa: SIM110  # a loop: any() over a generator costs more than these few tests
        if needle in lowered:
            return True
    return False


def lowered(texts: Iterable[str]) -> str | None:
    """A resource's texts lowered and joined for `may_match` (a needle found across two of them only means
    they are searched), or None when one is not ASCII (then they are always searched)."""
    texts = tuple(texts)
    return "\n".join(texts).lower() if all(text.isascii() for text in texts) else None


def _sequence(items: list[tuple[Any, Any]]) -> frozenset[str] | None:
    """The best required set of one concatenation: every item of it must match, so any one item's set (or
    a run of plain characters between them) is required of the whole; the strongest is kept."""
    best: frozenset[str] | None = None
    run: list[str] = []

    def close() -> None:
        nonlocal best
        if run:
            best = _stronger(best, frozenset({"".join(run)}))
            run.clear()

    for op, av in items:
        if op is _sre.LITERAL and av < 128:
            run.append(chr(av).lower())
            continue
        close()
        part: frozenset[str] | None = None
        if op is _sre.SUBPATTERN:
            part = _sequence(av[-1].data)
        elif op is _sre.ATOMIC_GROUP:
            part = _sequence(av.data)
        elif op is _sre.BRANCH:
            branches = [_sequence(branch.data) for branch in av[1]]
            part = None if any(b is None for b in branches) else frozenset().union(*branches)  # type: ignore[arg-type]
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT) and av[0] >= 1:
            part = _sequence(av[2].data)
        best = _stronger(best, part)  # anything else (a class, a look-around, an optional part) requires nothing
    close()
    return best


def _stronger(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """The set whose shortest string is longest (fewer strings on a tie): the likelier to rule a text out."""
    if a is None or b is None:
        return a if b is None else b

    def weight(s: frozenset[str]) -> tuple[int, int]:
        return min(map(len, s)), -len(s)
    return a if weight(a) >= weight(b) else b
