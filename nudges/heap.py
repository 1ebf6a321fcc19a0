"""Keeping the cyclic garbage collector out of the way of large requests.

A parsed hook call is tens of thousands of acyclic containers, all freed by reference counting when the
call ends. Any collection that runs meanwhile only walks them: a millisecond or more per collection, and
more collections the larger the body, which makes latency grow faster than the record."""

from __future__ import annotations

import gc
import threading
import time

_settled = [0]  # how many objects were frozen at the last full settle


def settle_heap() -> None:
    """After (re)loading rules, move the long-lived heap (compiled rules, models) out of the collector's
    sight, so a collection walks only what is young.

    A full collection of everything (unfreeze, collect, freeze) is what reclaims an old rule set's cycles,
    but it walks the whole heap. So it runs the first time and whenever the frozen heap has grown by half
    since; a reload in between only collects and freezes what is new."""
    frozen = gc.get_freeze_count()
    if not _settled[0] or frozen > _settled[0] * 1.5:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        _settled[0] = gc.get_freeze_count()
    else:
        gc.collect(1)
        gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class QuietCollector:
    """Automatic collection paused while requests are in flight, resumed when none is.

    Pausing only stops collections; reference counting frees a call's objects as before. So that cycles
    made elsewhere are still reclaimed when calls never stop overlapping, two bounds hold: a young
    collection runs at the end of a request once `limit` containers have been allocated unreclaimed, and
    a full-enough one (generations 0 and 1) once collection has been paused for `max_pause` seconds."""

    def __init__(self, limit: int = 1_000_000, max_pause: float = 2.0) -> None:
        self.limit = limit
        self.max_pause = max_pause
        self.in_flight = 0
        self._was_enabled = True
        self._paused_at = 0.0
        self._lock = threading.Lock()

    def __enter__(self) -> QuietCollector:
        with self._lock:
            self.in_flight += 1
            if self.in_flight == 1:
                self._was_enabled = gc.isenabled()
                self._paused_at = time.monotonic()
                gc.disable()
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                if self._was_enabled:
                    gc.enable()
            elif self._was_enabled and time.monotonic() - self._paused_at > self.max_pause:
                gc.collect(1)
                self._paused_at = time.monotonic()
            elif gc.get_count()[0] > self.limit:
                gc.collect(0)
