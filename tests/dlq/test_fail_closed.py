"""The DLQ fails closed (DESIGN.md §2.8): a write it cannot make is a refusal with a reason, never a
drop; eviction of the oldest files is an explicit policy (DLQ_WHEN_FULL=drop_oldest); the default
free-space margin never empties a small volume."""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from estat_ingest.config import Settings
from estat_ingest.dlq.store import MIN_FREE_SHARE, DlqStore, Limits, volume_bytes
from estat_ingest.formats.codec import compress
from estat_ingest.formats.keys import partition
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.base import Payload
from tests.dlq.util import counter_value, data_files, lines_for, run_async, write_entry


def payload(now: int, counter: int, n: int = 5) -> Payload:
    raw = lines_for(f"p{counter}", n, now)
    return Payload(f"{now:010d}_test-x_{counter:06d}.jsonl.gz", partition(now, "UTC"), n,
                   compress(raw, "gzip", 1), "gzip", now)


@run_async
async def test_reject_policy_refuses_a_full_dlq_and_evicts_nothing(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    now = int(time.time())
    names = [write_entry(d, now - 100 + i, i + 1, 10)[0] for i in range(4)]
    cap = sum((d / n).stat().st_size for n in names) + 10
    metrics = Metrics()
    store = DlqStore(str(tmp_path / "dlq"), "memory", metrics, limits=Limits(max_age_s=0, max_size_bytes=cap))
    await store.start()
    assert await store.put(payload(now, 50), "failed") == "full"
    await store.enforce()  # a pass evicts nothing either
    assert data_files(d) == names
    assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="capacity") == 0
    assert counter_value(metrics, "dlq_events_enqueued_total", sink="memory") == 0
    # a margin no disk can meet refuses too (drop_oldest would evict for it)
    store2 = DlqStore(str(tmp_path / "dlq2"), "memory", Metrics(), limits=Limits(min_free_bytes=10**18))
    await store2.start()
    assert await store2.put(payload(now, 51), "failed") == "full"


@pytest.mark.parametrize(("err", "refusal"), [
    (errno.ENOSPC, "no_space"), (errno.EROFS, "read_only"), (errno.EACCES, "permission"), (errno.EIO, "io_error")])
def test_disk_errors_are_refusals_and_leave_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           err: int, refusal: str) -> None:
    @run_async
    async def main() -> None:
        metrics = Metrics()
        store = DlqStore(str(tmp_path / "dlq"), "memory", metrics)
        await store.start()
        real_replace = os.replace

        def failing_replace(src: Any, dst: Any) -> None:
            if str(dst).endswith(".meta.json"):  # the data file is already in place: it must go again
                raise OSError(err, os.strerror(err))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing_replace)
        p = payload(int(time.time()), 1)
        assert await store.put(p, "failed") == refusal
        monkeypatch.setattr(os, "replace", real_replace)
        assert os.listdir(tmp_path / "dlq" / "memory") == []  # no data file, no temp
        assert counter_value(metrics, "dlq_write_errors_total", sink="memory") == 1
        assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="write_error") == 0
        assert await store.put(p, "failed") is None  # the disk is back: the same batch goes in
        assert data_files(tmp_path / "dlq" / "memory") == [p.name]

    main()


@run_async
async def test_default_margin_is_a_share_of_the_volume_and_logged(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    s = Settings.from_env({"DLQ_DIR": str(tmp_path / "dlq")})
    assert s.dlq_min_free_auto and s.dlq_when_full == "reject"
    assert not Settings.from_env({"DLQ_MIN_FREE_BYTES": "1MiB"}).dlq_min_free_auto
    store = DlqStore(s.dlq_dir, "memory", Metrics(), limits=Limits.of(s))
    with caplog.at_level(logging.INFO, "estat_ingest.dlq"):
        await store.start()
    size, _ = volume_bytes(store.dir)
    assert store.min_free_bytes == min(512 * 1024**2, int(size * MIN_FREE_SHARE))
    [line] = [r for r in caplog.records if r.getMessage() == "dlq capacity"]
    assert line.min_free_bytes == store.min_free_bytes and line.when_full == "reject"  # type: ignore[attr-defined]
    assert 0 < line.may_hold_bytes <= line.free_bytes  # type: ignore[attr-defined]
