"""The long-lived heap is settled after a rule load, so the collector walks only what is young, and
collection is never left off by the service."""

from __future__ import annotations

import gc

from conftest import LiveServer
from helpers import patient_view, troponin

from nudges.heap import settle_heap

URL = "/cds-services/nudges-patient-view"


def test_settling_freezes_the_loaded_heap_and_raises_the_young_threshold() -> None:
    kept = [{"rule": i} for i in range(1000)]  # stands for a compiled rule set
    settle_heap()
    assert gc.get_freeze_count() >= len(kept) and gc.get_threshold()[0] == 50_000
    before = gc.get_stats()[0]["collections"]
    garbage = [{"resource": i} for i in range(40_000)]  # a parsed 2 MB body is about this many containers
    del garbage
    assert gc.get_stats()[0]["collections"] == before  # no young collection walked the body


def test_the_service_settles_at_load_and_leaves_collection_on(client: LiveServer) -> None:
    assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == 50_000
    assert client.post(URL, json=patient_view("pt-1", troponin())).status_code == 200
    assert client.post(URL, content=b"{not json").status_code == 400
    assert client.post("/cds-services/nope", json={}).status_code == 404
    assert gc.isenabled()


def turns(coroutine) -> int:  # type: ignore[no-untyped-def]
    """How often a coroutine gives the event loop a turn before it finishes (driven by hand)."""
    count = 0
    try:
        while True:
            coroutine.send(None)
            count += 1
    except StopIteration:
        return count


def test_a_call_is_freed_after_the_answer_with_a_turn_of_the_loop_per_slice_not_per_bundle() -> None:
    """A typical visit's dozen small Bundles are freed without giving the loop a turn each (an epoll call
    apiece); a large one is freed a slice at a time, the loop turning between slices."""
    from nudges.api.routes.services import RELEASE_SLICE, release

    def body(bundles: int, entries: int) -> dict[str, object]:
        return {"prefetch": {f"k{b}": {"resourceType": "Bundle", "entry": [{"resource": {}}] * entries}
                             for b in range(bundles)} | {"patient": {"resourceType": "Patient"}}}

    visit = body(14, 3)
    assert turns(release(visit, "call", "result")) == 0
    assert all(not v.get("entry") for v in visit["prefetch"].values())  # type: ignore[union-attr]
    large = body(3, 2 * RELEASE_SLICE + 10)
    assert turns(release(large)) == 6  # 1,530 entries: a turn after every 250 or more freed
    assert all(not v.get("entry") for v in large["prefetch"].values())  # type: ignore[union-attr]
