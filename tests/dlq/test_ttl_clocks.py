"""TTL trusts no single clock: a file expires only when both the time in its name and its time on
this disk (monotonic, from its first sighting plus its mtime's age then) are past DLQ_MAX_AGE, and
a start-up that would expire most of the backlog at once waits one DLQ_MAX_AGE of monotonic time."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from estat_ingest.dlq.store import DlqStore, Limits
from estat_ingest.formats.codec import compress
from estat_ingest.formats.keys import partition
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.base import Payload
from tests.dlq.util import counter_value, data_files, lines_for, run_async, write_entry

DAY = 24 * 3600.0


class Clocks:
    def __init__(self, wall: float) -> None:
        self.w, self.m = wall, 1000.0

    def wall(self) -> float:
        return self.w

    def mono(self) -> float:
        return self.m


def store_with(tmp: Path, clocks: Clocks, metrics: Metrics) -> DlqStore:
    return DlqStore(str(tmp / "dlq"), "memory", metrics, limits=Limits(max_age_s=DAY, scan_limit=100),
                    wall=clocks.wall, mono=clocks.mono)


@run_async
async def test_a_wall_clock_jump_while_running_expires_nothing(tmp_path: Path) -> None:
    now = int(time.time())
    clocks, metrics = Clocks(now), Metrics()
    store = store_with(tmp_path, clocks, metrics)
    await store.start()
    for c in range(5):
        raw = lines_for(f"b{c}", 4, now)
        p = Payload(f"{now:010d}_t-x_{c:06d}.jsonl.gz", partition(now, "UTC"), 4, compress(raw, "gzip", 1),
                    "gzip", now)
        assert await store.put(p, "failed") is None
    clocks.w += DAY + 3600  # the wall clock jumps 25 h; the monotonic one moves a second
    clocks.m += 1
    assert await store.enforce() == 0 and len(data_files(Path(store.dir))) == 5
    clocks.m += DAY  # a real day on this disk: now both clocks agree
    assert await store.enforce() == 5
    assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="ttl") == 20


@run_async
async def test_a_jump_before_the_start_holds_the_ttl_for_one_period(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    now = int(time.time())
    d = tmp_path / "dlq" / "memory"
    names = [write_entry(d, now - 60 + i, i + 1, 3)[0] for i in range(10)]  # written a minute ago
    clocks, metrics = Clocks(now + DAY + 3600), Metrics()  # the process starts with a clock 25 h ahead
    store = store_with(tmp_path, clocks, metrics)
    with caplog.at_level(logging.WARNING, "estat_ingest.dlq"):
        await store.start()
    assert store.ttl_hold_until is not None
    assert any("clock may have jumped" in r.getMessage() for r in caplog.records)
    assert await store.enforce() == 0 and data_files(d) == names
    clocks.m += DAY - 1
    assert await store.enforce() == 0
    clocks.m += 2  # one DLQ_MAX_AGE of monotonic time later: by both clocks they are past it
    assert await store.enforce() == 10
    assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="ttl") == 30


@run_async
async def test_a_few_old_files_at_start_expire_at_once(tmp_path: Path) -> None:
    now = int(time.time())
    d = tmp_path / "dlq" / "memory"
    old, _ = write_entry(d, now - 2 * int(DAY), 1, 7)
    os.utime(d / old, (now - 2 * DAY, now - 2 * DAY))
    fresh = [write_entry(d, now - 60 + i, i + 2, 1)[0] for i in range(9)]
    copied, _ = write_entry(d, now - 2 * int(DAY) + 5, 20, 2)  # old by name, but copied here just now
    clocks, metrics = Clocks(now), Metrics()
    store = store_with(tmp_path, clocks, metrics)
    await store.start()
    assert store.ttl_hold_until is None  # 1 of 11: the clock is believed
    assert await store.enforce() == 1
    assert data_files(d) == sorted([copied, *fresh])
    assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="ttl") == 7
    clocks.m += DAY / 2
    clocks.w += DAY / 2
    assert await store.enforce() == 0  # the copy has been here half a day
    clocks.m += DAY / 2 + 1
    clocks.w += DAY / 2 + 1
    assert await store.enforce() == 10 and data_files(d) == []  # a day after they came here
