"""The collector is paused while request bodies are in flight and always resumed afterwards."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest
from conftest import LiveServer
from helpers import patient_view, troponin

from nudges.heap import QuietCollector

URL = "/cds-services/nudges-patient-view"


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    gc.enable() if was else gc.disable()


def test_paused_while_any_request_is_in_flight(collector_on: None) -> None:
    quiet = QuietCollector()
    with quiet:
        assert not gc.isenabled()
        with quiet:
            assert not gc.isenabled()
        assert not gc.isenabled() and quiet.in_flight == 1
    assert gc.isenabled() and quiet.in_flight == 0
    with pytest.raises(RuntimeError), quiet:
        raise RuntimeError("a failing request")
    assert gc.isenabled() and quiet.in_flight == 0


def test_young_generation_still_collected_when_requests_never_stop_overlapping(collector_on: None) -> None:
    quiet = QuietCollector(limit=0)
    with quiet:
        before = gc.get_stats()[0]["collections"]
        with quiet:
            garbage = [[] for _ in range(100)]
        del garbage
        assert gc.get_stats()[0]["collections"] > before
    assert gc.isenabled()


def test_a_pause_under_endless_overlap_is_bounded_in_time(collector_on: None) -> None:
    """Calls that always overlap would otherwise keep the older generations from ever being collected."""
    quiet = QuietCollector(max_pause=0.05)
    with quiet:
        before = gc.get_stats()[1]["collections"]
        for _ in range(3):
            with quiet:
                time.sleep(0.03)
        assert gc.get_stats()[1]["collections"] > before
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_left_off_by_the_host_stays_off() -> None:
    was = gc.isenabled()
    gc.disable()
    try:
        with QuietCollector():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable() if was else gc.disable()


def settled(client: LiveServer) -> bool:
    deadline = time.monotonic() + 5  # the middleware resumes collection after the answer has been sent
    while client.runtime.quiet.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    return client.runtime.quiet.in_flight == 0 and gc.isenabled()


def test_the_service_resumes_collection_after_calls_and_errors(client: LiveServer, collector_on: None) -> None:
    assert client.post(URL, json=patient_view("pt-1", troponin())).status_code == 200
    assert settled(client)
    assert client.post(URL, content=b"{not json").status_code == 400
    assert settled(client)
    assert client.post("/cds-services/nope", json={}).status_code == 404
    assert settled(client)
    assert client.get("/healthz").status_code == 200 and settled(client)
