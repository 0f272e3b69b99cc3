"""Batch closing rules, including the flush timer after idle periods (v1 defect §9 e)."""

from __future__ import annotations

from estat_ingest.pipeline.batcher import Batcher


def test_closes_at_max_events() -> None:
    b = Batcher(max_events=3, max_bytes=10_000, interval_s=60)
    assert b.add(1.0, b"a\n", 0) is None
    assert b.add(2.0, b"b\n", 0) is None
    closed = b.add(3.0, b"c\n", 0)
    assert closed is not None and closed.lines == [b"a\n", b"b\n", b"c\n"] and closed.first_ts == 1.0
    assert b.pending == 0 and b.deadline is None


def test_closes_before_byte_cap_is_exceeded() -> None:
    b = Batcher(max_events=100, max_bytes=10, interval_s=60)
    assert b.add(1.0, b"12345\n", 0) is None
    closed = b.add(2.0, b"67890\n", 0)  # 12 bytes would exceed 10: close the first, keep the second
    assert closed is not None and closed.lines == [b"12345\n"] and closed.nbytes == 6
    assert b.pending == 1
    assert b.take().first_ts == 2.0  # type: ignore[union-attr]


def test_interval_counts_from_first_event() -> None:
    b = Batcher(max_events=100, max_bytes=10_000, interval_s=5)
    b.add(1.0, b"x\n", now=100.0)
    b.add(1.0, b"y\n", now=104.0)
    assert not b.due(104.9)
    assert b.due(105.0)


def test_timer_keeps_working_after_idle_period() -> None:
    """v1 stopped re-arming its timer after an empty tick: a trickle then waited for BATCH_SIZE."""
    b = Batcher(max_events=5000, max_bytes=10_000_000, interval_s=2)
    b.add(1.0, b"first\n", now=0.0)
    assert b.due(2.0)
    assert b.take() is not None
    # a long idle period: nothing is due, nothing is pending
    assert not b.due(1000.0) and b.deadline is None
    # then a trickle: one event after the idle period must still be flushed on time
    b.add(2.0, b"late\n", now=1000.0)
    assert not b.due(1001.9)
    assert b.due(1002.0)
    closed = b.take()
    assert closed is not None and closed.lines == [b"late\n"]


def _state(b: Batcher) -> tuple[object, ...]:
    open_ = b._batch
    return (None if open_ is None else (list(open_.lines), open_.nbytes, open_.first_ts), b.deadline)


def test_add_many_is_add_in_a_loop() -> None:
    """The dispatcher's bulk path: same closed batches (lines, bytes, first ts), same open batch and
    deadline as adding one record at a time, across every limit and chunk shape."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    record = st.tuples(st.floats(0, 1e9, allow_nan=False), st.binary(min_size=0, max_size=40))

    @settings(max_examples=400, deadline=None)
    @given(st.integers(1, 8), st.integers(1, 120), st.lists(st.lists(record, max_size=12), max_size=8))
    def check(max_events: int, max_bytes: int, chunks: list[list[tuple[float, bytes]]]) -> None:
        one, bulk = Batcher(max_events, max_bytes, 5.0), Batcher(max_events, max_bytes, 5.0)
        for now, chunk in enumerate(chunks):
            expected = [c for c in (one.add(ts, line, float(now)) for ts, line in chunk) if c is not None]
            got = bulk.add_many(chunk, float(now))
            assert [(c.lines, c.nbytes, c.first_ts) for c in got] == \
                [(c.lines, c.nbytes, c.first_ts) for c in expected]
            assert _state(bulk) == _state(one)

    check()
