"""Progress on stderr: a bar redrawn in place on a terminal, otherwise a plain line every tenth of the way
(a log file or CI output should not fill with carriage returns)."""

from __future__ import annotations

from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, err: TextIO, unit: str = "") -> None:
        self.label, self.total, self.err, self.unit = label, max(total, 1), err, unit
        self.tty = err.isatty()
        self.shown = -1 if self.tty else 0

    def step(self, done: int, note: str = "") -> None:
        """`done` of `total` units; `note` says what the units amount to (patients so far)."""
        detail = f" {note}" if note else ""
        if self.tty:
            percent = min(done * 100 // self.total, 100)
            if percent != self.shown or done == self.total:
                self.shown = percent
                bar = "#" * (percent // 4)
                self.err.write(f"\r{self.label} [{bar:<25}] {percent:3d}%{detail}\033[K")
                self.err.flush()
        else:
            tenth = min(done * 10 // self.total, 10)
            if tenth > self.shown:
                self.shown = tenth
                self.err.write(f"{self.label}: {tenth * 10}%{detail}\n")

    def finish(self) -> None:
        if self.tty:
            self.err.write("\n")
            self.err.flush()
