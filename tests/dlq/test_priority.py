"""Fresh batches first (v1 §9 j): no replay while the sink's upload queue is full; the disk refusing a
DLQ write is counted and logged as write_error."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import orjson

from estat_ingest.dlq.store import DlqStore
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.base import Payload, Result
from estat_ingest.sinks.memory import MemorySink
from tests.dlq.util import counter_value, run_async, settings, wait_for, write_entry


class SlowFresh(MemorySink):
    """Fresh batches wait for `release`; DLQ files (instance t-abc123) go through at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.fresh_started = 0

    async def send(self, payload: Payload) -> Result:
        if "_t-abc123_" not in payload.name:
            self.fresh_started += 1
            await self.release.wait()
        return await super().send(payload)


@run_async
async def test_no_replay_while_the_upload_queue_is_full(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    for c in range(1, 6):
        write_entry(d, int(time.time()) - 100 + c, c, 2)
    sink = SlowFresh()
    sink.spec = replace(sink.spec, timeout_s=60)
    s = settings(tmp_path, batch_max_events=1, upload_queue_batches=1, upload_concurrency=1, dlq_max_age_s=0)
    p = Pipeline(s, Metrics(), [sink])
    # fill the lane before the replayer can run: one batch in flight, one waiting → queue full
    for i in range(3):
        assert p.queue.offer((time.time(), orjson.dumps({"fresh": i}) + b"\n"))
    await p.start()
    try:
        lane = p.lanes[0]
        await wait_for(lambda: sink.fresh_started == 1 and lane.upload_q.full(), 10, "a full upload queue")
        r = p.replayers[0]

        def replayed() -> int:
            return len([x for x in sink.calls if "_t-abc123_" in x.name])

        before = replayed()  # at most one wave could start before the queue filled up
        assert before <= s.dlq_replay_concurrency
        await wait_for(lambda: r.waiting_for_room and r.room_waits >= 1, 10, "the replayer to wait at the full queue")
        await asyncio.sleep(0.5)  # a while with the queue full: the replayer stays at the gate
        assert lane.upload_q.full() and r.waiting_for_room
        assert replayed() == before  # nothing replayed while fresh batches wait
        sink.release.set()
        await wait_for(lambda: len(lane.store.index) == 0, 20, "the DLQ to empty once the queue has room")
        await wait_for(lambda: len(sink.delivered) == 8, 20, "3 fresh + 5 replayed batches")
    finally:
        sink.release.set()
        await p.drain(5)


@run_async
async def test_a_dlq_write_the_disk_refuses_is_a_refusal_not_a_drop(tmp_path: Path) -> None:
    root = tmp_path / "dlq"
    metrics = Metrics()
    store = DlqStore(str(root), "memory", metrics)
    await store.start()
    (root / "memory").rmdir()
    (root / "memory").write_text("a file where the directory should be")  # every write now fails (ENOTDIR)
    p = Payload("1790000000_t-x_000001.jsonl.gz", "dt=2026-09-22/hr=01", 17, b"data", "gzip", 1_790_000_000)
    assert await store.put(p, "failed") == "io_error"  # the caller keeps the batch
    assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="write_error") == 0
    assert counter_value(metrics, "dlq_write_errors_total", sink="memory") == 1
    assert counter_value(metrics, "dlq_events_enqueued_total", sink="memory") == 0
