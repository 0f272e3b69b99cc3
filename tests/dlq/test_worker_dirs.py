"""`serve --workers N`: every DLQ directory under DLQ_DIR belongs to exactly one worker's index, so
the group's dlq_files_current / dlq_size_bytes (summed over workers by groupmetrics.py) count each
file once, and the directories of an earlier run with more workers (or of a single `serve`) are
still replayed, each by one worker."""

from __future__ import annotations

from pathlib import Path

from estat_ingest.dlq.store import DlqStore
from estat_ingest.metrics import Metrics
from tests.dlq.util import counter_value, run_async, settings, write_entry


def _layout(dlq: Path) -> dict[str, int]:
    """Files in DLQ_DIR/memory, w0..w5/memory and one v1 pair at the top: files per directory."""
    sizes: dict[str, int] = {}
    for i, sub in enumerate(["memory", "w0/memory", "w1/memory", "w2/memory", "w3/memory", "w5/memory"]):
        for c in range(i + 1):  # a different count per directory, so a double count shows
            write_entry(dlq / sub, 1_700_000_000 + c, 100 * i + c, 2)
        sizes[sub] = i + 1
    write_entry(dlq, 1_700_000_500, 999, 1, v1=True)  # a v1 pair directly in DLQ_DIR
    sizes["."] = 1
    return sizes


async def _start(tmp: Path, worker: int, workers: int, reads_v1: bool) -> tuple[DlqStore, Metrics]:
    metrics = Metrics()
    s = settings(tmp, workers=workers)
    store = DlqStore(str(tmp / "dlq" / f"w{worker}"), "memory", metrics, settings=s, reads_v1=reads_v1)
    await store.start()
    return store, metrics


@run_async
async def test_each_directory_is_indexed_by_one_worker_and_the_gauges_sum_to_the_disk(tmp_path: Path) -> None:
    sizes = _layout(tmp_path / "dlq")
    total = sum(sizes.values())
    for reads_v1 in (False, True):
        stores = [await _start(tmp_path, i, 2, reads_v1) for i in range(2)]
        dlq = str(tmp_path / "dlq")
        sources = [{str(Path(d).relative_to(dlq)) for d in st.sources} for st, _ in stores]
        # worker 0: its own, DLQ_DIR/<sink>, w2 (2 mod 2); worker 1: its own, w3 and w5 (odd)
        want0 = {"w0/memory", "memory", "w2/memory"} | ({"w0", "."} if reads_v1 else set())
        want1 = {"w1/memory", "w3/memory", "w5/memory"} | ({"w1"} if reads_v1 else set())
        assert sources == [want0, want1]
        files = [counter_value(m, "dlq_files_current", sink="memory") for _, m in stores]
        expected = total if reads_v1 else total - sizes["."]
        assert sum(files) == expected, files
        on_disk = sum(p.stat().st_size for p in (tmp_path / "dlq").rglob("*.jsonl.gz")
                      if reads_v1 or p.parent != tmp_path / "dlq")
        assert sum(counter_value(m, "dlq_size_bytes", sink="memory") for _, m in stores) == on_disk


@run_async
async def test_one_process_still_replays_every_worker_root(tmp_path: Path) -> None:
    sizes = _layout(tmp_path / "dlq")
    metrics = Metrics()
    store = DlqStore(str(tmp_path / "dlq"), "memory", metrics, settings=settings(tmp_path), reads_v1=True)
    await store.start()
    assert counter_value(metrics, "dlq_files_current", sink="memory") == sum(sizes.values())
