"""The DLQ follows its disk: a claim the directory refuses (EACCES, EROFS) is retried with backoff
instead of stranding the file; a deleted directory, or files deleted by hand, leave the index and
the gauges within one sweep and are counted in dlq_files_lost_total{reason}."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import pytest

from estat_ingest.dlq import files
from estat_ingest.dlq.store import DlqStore, Limits
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.memory import MemorySink
from tests.dlq.util import counter_value, data_files, ids_in, run_async, settings, wait_for, write_entries, write_entry


@run_async
async def test_a_deleted_directory_is_noticed_counted_and_recreated(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    write_entries(d, range(1, 7), 3)
    metrics = Metrics()
    store = DlqStore(str(tmp_path / "dlq"), "memory", metrics, limits=Limits(max_age_s=0, scan_limit=100))
    await store.start()
    assert counter_value(metrics, "dlq_files_current", sink="memory") == 6
    shutil.rmtree(d)
    await store.rescan()  # one pass
    assert counter_value(metrics, "dlq_files_lost_total", sink="memory", reason="directory_gone") == 6
    assert counter_value(metrics, "dlq_files_current", sink="memory") == 0
    assert counter_value(metrics, "dlq_size_bytes", sink="memory") == 0
    assert d.is_dir() and len(store.index) == 0  # new batches can be written again


@run_async
async def test_files_deleted_by_hand_leave_the_gauges_within_one_sweep(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    names = [write_entry(d, 1_700_000_000 + i, i + 1, 2)[0] for i in range(8)]
    metrics = Metrics()
    store = DlqStore(str(tmp_path / "dlq"), "memory", metrics, limits=Limits(max_age_s=0, scan_limit=100))
    await store.start()
    for n in names[2:5]:
        (d / n).unlink()
        (d / (n + ".meta.json")).unlink()
    await store.rescan()  # the directory fits in one pass: one pass is a whole sweep
    assert counter_value(metrics, "dlq_files_lost_total", sink="memory", reason="vanished") == 3
    assert counter_value(metrics, "dlq_files_current", sink="memory") == 5
    assert counter_value(metrics, "dlq_size_bytes", sink="memory") == sum((d / n).stat().st_size for n in data_files(d))
    await store.rescan()
    assert counter_value(metrics, "dlq_files_lost_total", sink="memory", reason="vanished") == 3  # once


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_a_refused_claim_is_retried_with_backoff_not_stranded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              err: int) -> None:
    @run_async
    async def main() -> None:
        d = tmp_path / "dlq" / "memory"
        ids = write_entries(d, range(1, 5), 3)
        real = files.claim
        refusals = [3]

        def claim(directory: str, name: str, owner: str, now: Any = None) -> str | None:
            if refusals[0] > 0:
                refusals[0] -= 1
                raise OSError(err, "refused by the test")
            return real(directory, name, owner, now)

        monkeypatch.setattr(files, "claim", claim)
        sink = MemorySink()
        metrics = Metrics()
        p = Pipeline(settings(tmp_path, dlq_max_age_s=0), metrics, [sink])
        await p.start()
        try:
            await wait_for(lambda: len(p.lanes[0].store.index) == 0, 30, "the DLQ to empty")
        finally:
            await p.drain(5)
        assert refusals[0] == 0
        assert sorted(ids_in((x.name, x.data) for x in sink.delivered)) == sorted(ids)
        assert data_files(d) == [] and not list(d.glob("*.claim-*"))
        assert counter_value(metrics, "dlq_files_current", sink="memory") == 0

    main()
