"""BUFFER_MAX_BYTES: memory held by accepted events is bounded by bytes across the whole pipeline.

With large events the per-stage bounds (CHANNEL_SIZE events, BATCH_MAX_BYTES, UPLOAD_QUEUE batches,
uploads in flight) multiply to hundreds of MB; the byte budget caps their sum, answers 503 while it
is spent, closes open batches early so it drains, and gives every byte back once delivered or
spilled.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from pathlib import Path

import orjson
from multidict import CIMultiDict

from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.pipeline.queue import EventQueue
from estat_ingest.sinks.base import Result
from estat_ingest.sinks.memory import MemorySink
from tests.pipeline.test_engine import FAST, dlq_files, sample, settings

MiB = 1024 * 1024


def _size(item: tuple[float, bytes]) -> int:
    return len(item[1])


def test_queue_refuses_while_the_budget_is_spent_and_accepts_after_release() -> None:
    q: EventQueue[tuple[float, bytes]] = EventQueue(100, max_bytes=1000, size=_size)
    assert q.offer((0.0, b"x" * 600))
    assert q.held_bytes == 600 and q.room() == 99
    # checked before the offer, not against its size: one request may pass the budget, so no
    # request is ever too large to fit
    assert q.offer_many([(0.0, b"y" * 300), (0.0, b"z" * 300)])
    assert q.held_bytes == 1200 and q.over_budget and q.room() == 0
    assert not q.offer((0.0, b"a"))
    assert not q.offer_many([(0.0, b"b")])
    assert len(q) == 3 and q.held_bytes == 1200  # a refused offer charges nothing
    q.release(600)
    assert not q.over_budget and q.offer((0.0, b"c"))
    assert q.held_bytes == 601


def test_weight_charges_each_line_once_per_sink() -> None:
    q: EventQueue[tuple[float, bytes]] = EventQueue(10, max_bytes=1000, size=_size, weight=3)
    assert q.offer_many([(0.0, b"x" * 100), (0.0, b"y" * 50)])
    assert q.held_bytes == 450


def test_without_a_size_function_there_is_no_byte_bound() -> None:
    q: EventQueue[bytes] = EventQueue(3, max_bytes=1)
    assert q.offer(b"x" * 10) and q.offer(b"y" * 10) and q.offer(b"z")
    assert not q.offer(b"w")  # the count bound still holds


def big_event(i: int) -> bytes:
    return orjson.dumps({"i": i, "pad": "p" * 16_000})


def test_budget_bounds_what_a_stuck_sink_holds_and_every_byte_comes_back(tmp_path: Path) -> None:
    """16 KB events into a stuck sink: the per-stage bounds alone would hold 300+ events
    (channel 200 + open batch 100 + queued 1 + in flight 1 batch of 100); the budget holds ~1 MiB."""

    async def main() -> None:
        s = settings(tmp_path, buffer_max_bytes=1 * MiB, channel_size=200, batch_max_events=100,
                     upload_queue_batches=1, upload_concurrency=1, flush_interval_s=120.0)
        sink = MemorySink(gated=True)
        m = Metrics()
        pipe = Pipeline(s, m, [sink], backoff=FAST)
        await pipe.start()
        c = Collector(s, pipe.queue, m)
        c.accepting = True
        accepted: list[int] = []
        statuses: list[int] = []
        for i in range(400):
            r = c.handle("POST", "/collect", "", CIMultiDict(), big_event(i), None)
            statuses.append(r.status)
            if r.status == 200:
                accepted.append(i)
            await asyncio.sleep(0)
        assert 503 in statuses
        per_event = pipe.queue.held_bytes / len(accepted)
        assert per_event > 16_000
        # refused once the budget was spent: at most one request past it
        assert pipe.queue.held_bytes <= 1 * MiB + 17_000
        assert len(accepted) <= 1 * MiB // 16_000 + 1
        assert sample(m, "ingest_buffer_bytes") == pipe.queue.held_bytes
        assert sample(m, "ingest_buffer_capacity_bytes") == 1 * MiB
        assert sample(m, "http_requests_rejected_total", reason="queue_full") == statuses.count(503)

        # the open batch held a real share of the spent budget, so it was closed early (not at
        # FLUSH_INTERVAL = 120 s) and is waiting at the sink
        until = time.monotonic() + 30  # a bound for a stuck test, not a speed requirement
        while pipe.lanes[0].batcher.pending and time.monotonic() < until:  # the dispatcher's turn
            await asyncio.sleep(0.01)
        assert pipe.lanes[0].batcher.pending == 0 and len(pipe.queue) == 0  # closed below BATCH_SIZE

        assert sink.gate is not None
        sink.gate.set()
        until = time.monotonic() + 30
        while pipe.queue.held_bytes and time.monotonic() < until:  # the delivery gives the bytes back
            await asyncio.sleep(0.01)
        assert pipe.queue.held_bytes == 0
        assert c.handle("POST", "/collect", "", CIMultiDict(), big_event(10_000), None).status == 200
        await pipe.drain(5)
        got = sorted(orjson.loads(orjson.loads(line)["body"])["i"] for line in sink.lines())
        assert got == sorted([*accepted, 10_000])
        assert pipe.queue.held_bytes == 0

    asyncio.run(main())


def test_budget_drains_early_without_waiting_for_the_flush_interval(tmp_path: Path) -> None:
    """A healthy sink, a batch size the budget can never reach: batches close when the budget is
    spent, so a client retrying its 503s gets every event in, long before FLUSH_INTERVAL."""

    async def main() -> None:
        s = settings(tmp_path, buffer_max_bytes=1 * MiB, batch_max_bytes=64 * MiB, batch_max_events=100_000,
                     flush_interval_s=3600.0)
        sink = MemorySink()
        pipe = Pipeline(s, Metrics(), [sink], backoff=FAST)
        await pipe.start()
        c = Collector(s, pipe.queue, pipe.metrics)
        c.accepting = True
        refused = 0
        until = time.monotonic() + 60  # a bound for a wedged budget, not a speed requirement
        for i in range(300):  # ~4.8 MB through a 1 MiB budget
            while c.handle("POST", "/collect", "", CIMultiDict(), big_event(i), None).status != 200:
                refused += 1
                assert time.monotonic() < until, "the budget never drained"
                await asyncio.sleep(0.001)
            await asyncio.sleep(0)
        assert refused > 0
        assert len(sink.delivered) >= 3  # closed by the budget, not by size or interval
        await pipe.drain(5)
        got = [orjson.loads(orjson.loads(line)["body"])["i"] for line in sink.lines()]
        assert sorted(got) == list(range(300))
        assert pipe.queue.held_bytes == 0

    asyncio.run(main())


def test_spilled_batches_give_their_bytes_back(tmp_path: Path) -> None:
    """A sink that always fails: batches end in the DLQ and the budget is free again."""

    async def main() -> None:
        s = settings(tmp_path, buffer_max_bytes=1 * MiB, batch_max_events=10)
        sink = MemorySink(attempts=1)
        from estat_ingest.sinks.base import Outcome

        for _ in range(100):
            sink.script.append(Result(Outcome.RETRY, "down"))
        pipe = Pipeline(s, Metrics(), [sink], backoff=FAST)
        await pipe.start()
        c = Collector(s, pipe.queue, pipe.metrics)
        c.accepting = True
        for i in range(30):
            while c.handle("POST", "/collect", "", CIMultiDict(), big_event(i), None).status != 200:
                await asyncio.sleep(0.001)
        await pipe.flush_and_wait()
        assert pipe.queue.held_bytes == 0
        await pipe.drain(5)
        in_dlq = [orjson.loads(orjson.loads(line)["body"])["i"]
                  for f in dlq_files(tmp_path / "dlq") for line in gzip.decompress(f.read_bytes()).splitlines()]
        assert sorted(in_dlq) == list(range(30)) and not sink.delivered

    asyncio.run(main())


def test_fan_out_counts_each_line_once_per_sink_and_releases_per_lane(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path, buffer_max_bytes=64 * MiB, batch_max_events=5)
        a, b = MemorySink(), MemorySink(name="other")
        pipe = Pipeline(s, Metrics(), [a, b], backoff=FAST)
        c = Collector(s, pipe.queue, pipe.metrics)
        c.accepting = True
        body = orjson.dumps({"k": "v"})
        assert c.handle("POST", "/collect", "", CIMultiDict(), body, None).status == 200
        line = pipe.queue.snapshot()[0][1]
        assert pipe.queue.held_bytes == 2 * len(line)
        await pipe.start()
        for _ in range(9):
            assert c.handle("POST", "/collect", "", CIMultiDict(), body, None).status == 200
        await pipe.flush_and_wait()
        assert pipe.queue.held_bytes == 0
        await pipe.drain(5)
        assert len(a.lines()) == len(b.lines()) == 10

    asyncio.run(main())
