"""The hot-path shortcuts keep what they replaced: LoopCounter values are the
Prometheus values, and IdGen's cached prefix gives the same ids as formatting every time."""

from __future__ import annotations

from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.record import IdGen


def test_loop_counters_read_the_same_as_plain_counters_through_every_reader() -> None:
    m = Metrics()
    for _ in range(7):
        m.http_requests.inc()
    m.http_accepted.inc(5)
    m.events_accepted.inc(100)
    assert m.registry.get_sample_value("http_requests_total") == 7.0
    m.http_requests.inc(3)  # increments after a read are not lost
    text = m.render().decode()
    assert "http_requests_total 10.0" in text
    assert "http_requests_accepted_total 5.0" in text
    assert "ingest_events_accepted_total 100.0" in text
    assert m.registry.get_sample_value("http_requests_total") == 10.0  # reading twice folds nothing twice
    m.http_requests.reset()
    assert m.registry.get_sample_value("http_requests_total") == 0.0


def reference_id(ms: int, middle: str, counter: int) -> str:
    return f"{ms:012x}{middle}{counter:06x}"


def test_ids_match_the_documented_format_across_ms_changes_and_a_clock_step_back() -> None:
    g = IdGen()
    middle = g._middle
    times = [1764821594.0, 1764821594.0004, 1764821594.0011, 1764821593.5, 1764821594.0011, 1764821600.25]
    got = [g.next(t) for t in times]
    last_ms, want = 0, []
    for counter, t in enumerate(times, 1):
        last_ms = max(last_ms, int(t * 1000))  # a clock that steps back keeps the last ms
        want.append(reference_id(last_ms, middle, counter))
    assert got == want
    assert got == sorted(got)
    assert all(len(i) == 30 for i in got)
