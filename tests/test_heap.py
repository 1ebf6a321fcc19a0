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
