"""Progress for long command-line work (loading a large rule set, running its cases, replaying many calls),
drawn on a terminal only: a line redrawn in place on stderr, wiped when the work is done, so output that
is piped, captured or logged stays exactly the same."""

from __future__ import annotations

import time
from typing import TextIO

DELAY = 0.5  # seconds of work before anything is drawn: a quick, cached run shows nothing


class Progress:
    """`step(done)` as work advances; `finish()` at the end. On a terminal a bar `[#####    ] 12/25 what`;
    elsewhere nothing, unless `plain` asks for a line every tenth of the way (long NDJSON screens in logs)."""

    def __init__(self, total: int, what: str, err: TextIO, *, plain: bool = False, delay: float = DELAY,
                 prefix: str = "", counts: bool = True) -> None:
        self.total, self.what, self.err, self.prefix = max(total, 0), what, err, prefix
        self.counts = counts  # "12/25 patients" after the percentage; off for units nobody counts (bytes)
        self.tty = _is_terminal(err)
        self.plain = plain and not self.tty
        self.start = time.monotonic()
        self.delay = delay
        self.shown = 0 if self.plain else -1  # plain lines from the first tenth on
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        """As a callback for work that learns its total as it goes (rules.compiler.load_ruleset)."""
        self.total = total
        self.step(done)

    def step(self, done: int, note: str = "") -> None:
        """`done` of `total`; `note` says what that amounts to so far ("1,200 patients")."""
        counted = f" {done}/{self.total} {self.what}" if self.counts else ""
        detail = f" {note}" if note else ""
        if self.tty:
            if time.monotonic() - self.start < self.delay:
                return
            percent = min(done * 100 // max(self.total, 1), 100)
            if percent != self.shown or done == self.total:
                self.shown = percent
                bar = "#" * (percent // 4)
                self.err.write(f"\r{self.prefix}[{bar:<25}] {percent:3d}%{counted}{detail}\033[K")
                self.err.flush()
                self.drawn = True
        elif self.plain:
            tenth = min(done * 10 // max(self.total, 1), 10)
            if tenth > self.shown:
                self.shown = tenth
                where = counted.lstrip() if self.counts else f"{tenth * 10}%"
                self.err.write(f"{self.prefix}{where}{detail}\n")

    def clear(self) -> None:
        """Wipe the bar, before other output goes to the same terminal (it is drawn again at the next step)."""
        if self.drawn:
            self.err.write("\r\033[K")
            self.err.flush()
            self.drawn = False
            self.shown = -1

    finish = clear  # at the end: what follows starts on a clean line


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
