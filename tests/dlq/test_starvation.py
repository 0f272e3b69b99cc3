"""Starvation (v1 §9 i): 5,000 files, DLQ_SCAN_LIMIT=100, created in an order unrelated to their names.
All are delivered, oldest first; files dropped in by another process are found by the rotating scan
within the documented bound of passes."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.base import Payload, Result
from estat_ingest.sinks.memory import MemorySink
from tests.dlq.util import counter_value, data_files, run_async, settings, wait_for, write_entry

N = 5000
PEER = 1000
LIMIT = 100


class PassRecorder(MemorySink):
    """Records, for every delivered file, the replayer pass it was delivered in."""

    def __init__(self) -> None:
        super().__init__()
        self.pipeline: Pipeline | None = None
        self.pass_of: dict[str, int] = {}

    async def send(self, payload: Payload) -> Result:
        assert self.pipeline is not None
        self.pass_of[payload.name] = self.pipeline.replayers[0].passes
        return await super().send(payload)


@run_async
async def test_5000_files_oldest_first_and_peer_files_within_the_pass_bound(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    base = int(time.time()) - 3600
    unixes = [base + i for i in range(N)]
    order = list(range(N))
    random.Random(7).shuffle(order)  # directory order and creation order unrelated to names
    for c, i in enumerate(order):
        write_entry(d, unixes[i], c % 999_999 + 1, 1, instance=f"t{i:05d}")
    sink = PassRecorder()
    metrics = Metrics()
    p = Pipeline(settings(tmp_path, dlq_scan_limit=LIMIT, dlq_replay_concurrency=4, dlq_max_age_s=0), metrics, [sink])
    sink.pipeline = p
    await p.start()
    store = p.lanes[0].store
    try:
        await wait_for(lambda: len(sink.delivered) == N and len(store.index) == 0, 90, f"{N} files delivered")
        delivered = [int(x.name[:10]) for x in sink.delivered]
        # concurrency 4: within one wave of 4 the completion order may differ; across waves it is sorted
        assert all(delivered[i] <= delivered[i + 4] for i in range(len(delivered) - 4))
        assert sorted(delivered) == unixes
        assert data_files(d) == []
        # a peer process drops files straight into the directory (not through this store)
        start_pass = p.replayers[0].passes
        peer_order = list(range(PEER))
        random.Random(8).shuffle(peer_order)
        for c, i in enumerate(peer_order):
            write_entry(d, base - 10_000 + i, c + 1, 1, instance=f"peer{i:04d}")
        await wait_for(lambda: len(sink.delivered) == N + PEER and len(store.index) == 0, 60,
                       "peer files delivered and deleted")
        # documented bound: found within ceil(entries / limit) passes (entries = data + meta),
        # then delivered within ceil(files / limit) more passes (a pass attempts up to `limit` files)
        bound = math.ceil(2 * PEER / LIMIT) + math.ceil(PEER / LIMIT) + 1
        worst = max(sink.pass_of[x.name] for x in sink.delivered[N:]) - start_pass
        assert worst <= bound, (worst, bound)
        assert counter_value(metrics, "dlq_events_reuploaded_total", sink="memory") == N + PEER
        assert counter_value(metrics, "dlq_files_current", sink="memory") == 0
    finally:
        await p.drain(5)
    assert len(store.index) == 0
