"""TTL and capacity: every event deleted without delivery moves dlq_events_dropped_total{reason} by
exactly that many, and is logged; the gauges are rebuilt exactly from disk at start (v1 §9 h)."""

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


@run_async
async def test_ttl_drops_exactly_the_expired_events(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "dlq" / "memory"
    now = int(time.time())
    expired = [write_entry(d, now - 7200 - i, i + 1, 3 + i)[0] for i in range(4)]  # 3+4+5+6 = 18 events
    for i, n in enumerate(expired):  # written when their batch closed: old by name and by time on disk
        os.utime(d / n, (now - 7200 - i, now - 7200 - i))
    # (a small share of the backlog: more would hold the TTL for a while at start, test_ttl_clocks.py)
    kept = [write_entry(d, now - 60 + i, 10 + i, 7)[0] for i in range(40)]
    (d / "notes.txt").write_text("foreign")
    metrics = Metrics()
    store = DlqStore(str(tmp_path / "dlq"), "memory", metrics, limits=Limits(max_age_s=3600, scan_limit=10))
    await store.start()
    assert counter_value(metrics, "dlq_files_current", sink="memory") == 44  # foreign file not counted
    with caplog.at_level(logging.ERROR, "estat_ingest.dlq"):
        assert await store.enforce() == 4
    assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="ttl") == 18
    assert counter_value(metrics, "dlq_files_expired_total", sink="memory") == 4
    assert data_files(d) == sorted([*kept, "notes.txt"])
    assert not any((d / (n + ".meta.json")).exists() for n in expired)
    assert counter_value(metrics, "dlq_files_current", sink="memory") == 40
    assert counter_value(metrics, "dlq_size_bytes", sink="memory") == sum((d / n).stat().st_size for n in kept)
    drops = [r for r in caplog.records if r.getMessage() == "dlq events dropped"]
    assert sorted((r.file, r.events, r.reason) for r in drops) == sorted(  # type: ignore[attr-defined]
        (n, 3 + i, "ttl") for i, n in enumerate(expired))


@run_async
async def test_drop_oldest_evicts_oldest_first_and_counts_every_event(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    now = int(time.time())
    names = [write_entry(d, now - 1000 + i, i + 1, 10 + i)[0] for i in range(6)]
    sizes = {n: (d / n).stat().st_size for n in names}
    metrics = Metrics()
    cap = sum(sizes.values()) + 10
    store = DlqStore(str(tmp_path / "dlq"), "memory", metrics,
                     limits=Limits(max_age_s=0, max_size_bytes=cap, when_full="drop_oldest"))
    await store.start()
    assert counter_value(metrics, "dlq_size_bytes", sink="memory") == sum(sizes.values())
    # a new batch that needs room for about two old files
    raw = lines_for("new", 50, now)
    data = compress(raw, "gzip", 1)
    while len(data) < sizes[names[0]] + sizes[names[1]] - 10:
        raw += lines_for("pad", 50, now)
        data = compress(raw, "gzip", 1)
    p = Payload(f"{now:010d}_test-x_000099.jsonl.gz", partition(now, "UTC"), raw.count(b"\n"), data, "gzip", now)
    assert await store.put(p, "failed") is None
    on_disk = data_files(d)
    evicted = [n for n in names if n not in on_disk]
    assert evicted == names[: len(evicted)] and len(evicted) >= 2  # oldest first
    want = sum(10 + names.index(n) for n in evicted)
    assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="capacity") == want
    total = sum((d / n).stat().st_size for n in on_disk)
    assert total <= cap and counter_value(metrics, "dlq_size_bytes", sink="memory") == total
    assert counter_value(metrics, "dlq_events_enqueued_total", sink="memory") == p.num_events
    # a batch larger than the cap on its own is refused (the caller keeps it); nothing is lost for it
    big = Payload(f"{now:010d}_test-x_000100.jsonl.gz", "dt=x/hr=y", 7, b"x" * (cap + 1), "gzip", now)
    assert await store.put(big, "failed") == "too_large"
    assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="capacity") == want
    assert data_files(d) == on_disk


@run_async
async def test_restart_rebuilds_exact_gauges_and_cleans_crash_leftovers(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    now = int(time.time())
    names = [write_entry(d, now - 100 + i, i + 1, 2)[0] for i in range(5)]
    (d / f".{names[0]}.tmp-999999-abcdef").write_bytes(b"half a write")  # dead pid
    (d / f".{names[1]}.tmp-{__import__('os').getpid()}-abcdef").write_bytes(b"ours, from before")
    orphan = d / "1600000000_old_000001.jsonl.gz.meta.json"
    orphan.write_text('{"num_events": 1}')
    import os
    os.utime(orphan, (now - 10_000, now - 10_000))
    claimed = d / f"{names[2]}.claim-{now - 10_000}-deadhost-1"
    (d / names[2]).rename(claimed)
    old_tmp = d / f".{names[3]}.tmp-999998-abcdef"
    old_tmp.write_bytes(b"x")
    os.utime(old_tmp, (now - 60, now - 60))
    metrics = Metrics()
    store = DlqStore(str(tmp_path / "dlq"), "memory", metrics, limits=Limits(claim_timeout_s=300, scan_limit=10))
    await store.start()
    assert counter_value(metrics, "dlq_files_current", sink="memory") == 5  # the stale claim is recovered
    assert counter_value(metrics, "dlq_size_bytes", sink="memory") == sum((d / n).stat().st_size for n in names)
    assert counter_value(metrics, "dlq_oldest_file_age_seconds", sink="memory") >= 99
    assert not orphan.exists() and not claimed.exists() and not old_tmp.exists()
    left = sorted(p.name for p in d.iterdir() if p.name.startswith("."))
    # our own pid's temp (before this start: a dead predecessor in a container) is removed too
    assert left == [f".{names[0]}.tmp-999999-abcdef"]  # a dead pid, but younger than 10 s: may be a peer host


@run_async
async def test_drop_oldest_free_disk_margin_evicts_oldest_for_a_new_write_and_still_writes_it(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    now = int(time.time())
    names = [write_entry(d, now - 100 + i, i + 1, 4)[0] for i in range(3)]
    metrics = Metrics()
    # a margin no disk can meet: every old file goes, oldest first, and the new batch is still written
    store = DlqStore(str(tmp_path / "dlq"), "memory", metrics,
                     limits=Limits(max_age_s=0, min_free_bytes=10**18, when_full="drop_oldest"))
    await store.start()
    await store.enforce()  # a pass alone does not evict for the disk margin
    assert data_files(d) == names
    raw = lines_for("new", 5, now)
    p = Payload(f"{now:010d}_test-x_000050.jsonl.gz", partition(now, "UTC"), 5, compress(raw, "gzip", 1), "gzip", now)
    assert await store.put(p, "failed") is None
    assert data_files(d) == [p.name]
    assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="capacity") == 12
    assert counter_value(metrics, "dlq_files_current", sink="memory") == 1


@run_async
async def test_start_up_scan_over_its_budget_finishes_in_the_background(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    now = int(time.time())
    names = [write_entry(d, now - 3000 + i, i + 1, 1)[0] for i in range(2500)]
    metrics = Metrics()
    store = DlqStore(str(tmp_path / "dlq"), "memory", metrics,
                     limits=Limits(max_age_s=0, scan_limit=100, start_scan_budget_s=0.0))
    await store.start()  # returns at once: a big backlog never delays readiness
    assert not store.indexed.is_set() and len(store.index) < 2500
    assert await store.finish_start()
    assert store.indexed.is_set() and len(store.index) == 2500
    assert counter_value(metrics, "dlq_files_current", sink="memory") == 2500
    assert counter_value(metrics, "dlq_size_bytes", sink="memory") == sum((d / n).stat().st_size for n in names)
