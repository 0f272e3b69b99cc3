"""Fail closed (DESIGN.md §2.8), in process: while the sink fails and the DLQ refuses (read-only,
full), undelivered batches stay in memory within BUFFER_MAX_BYTES and /collect answers 503
`dlq_unavailable`; nothing is dropped, and once the sink (or the DLQ) is back every accepted event
is delivered exactly once. Only the drain's deadline ends a hold, and what it ends is counted."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from estat_ingest.dlq.store import DlqStore
from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.base import OK, Outcome, Payload, Result
from estat_ingest.sinks.memory import MemorySink
from tests.dlq.util import wait_for
from tests.pipeline.test_engine import FAST, sample, settings

MiB = 1024 * 1024


class Switch(MemorySink):
    """A sink that fails (connection refused) until `up` is set."""

    def __init__(self) -> None:
        super().__init__(attempts=2)
        self.up = False

    async def send(self, payload: Payload) -> Result:
        self.calls.append(payload)
        if not self.up:
            return Result(Outcome.RETRY, "connection")
        self.delivered.append(payload)
        return OK


def refuse_writes(monkeypatch: pytest.MonkeyPatch, err: int) -> list[bool]:
    """Every DLQ write fails with `err` while the returned flag's first item is True."""
    refusing = [True]
    real = DlqStore.write_sync

    def write_sync(self: DlqStore, payload: Payload, reason: str, directory: str | None = None) -> None:
        if refusing[0]:
            raise OSError(err, "refused by the test")
        real(self, payload, reason, directory)

    monkeypatch.setattr(DlqStore, "write_sync", write_sync)
    return refusing


def post(c: Collector, i: int) -> tuple[int, str, str]:
    body = orjson.dumps({"i": i, "pad": "x" * 2000}).decode()
    reply = c.handle("POST", "/collect", "", CIMultiDict(), body.encode(), "198.51.100.1")
    return reply.status, reply.body.decode(), body


def bodies_of(sink: MemorySink) -> list[str]:
    return [orjson.loads(line)["body"] for line in sink.lines()]


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC])
def test_sink_down_and_dlq_refusing_answers_503_then_delivers_everything_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    refusing = refuse_writes(monkeypatch, err)

    async def main() -> None:
        s = settings(tmp_path, buffer_max_bytes=MiB, batch_max_events=20, flush_interval_s=0.05,
                     dlq_min_free_bytes=0)
        m = Metrics()
        sink = Switch()
        pipe = Pipeline(s, m, [sink], backoff=FAST)
        await pipe.start()
        c = Collector(s, pipe.queue, m)
        c.accepting = True
        accepted: list[str] = []
        refused = 0
        try:
            for i in range(5000):  # until the held batches fill the budget
                status, text, body = post(c, i)
                if status == 200:
                    accepted.append(body)
                    await asyncio.sleep(0)
                    continue
                assert status == 503
                if "DLQ" in text:
                    refused += 1
                    if refused >= 20:
                        break
                await asyncio.sleep(0.01)  # queue_full before anything is held: let the uploaders work
            assert refused >= 20, "expected 503 dlq_unavailable once held batches fill the budget"
            assert sample(m, "http_requests_rejected_total", reason="dlq_unavailable") >= 20
            assert sample(m, "dlq_unavailable", sink="memory") == 1
            assert sample(m, "ingest_held_events", sink="memory") > 0
            assert pipe.queue.held_bytes >= MiB  # held within the budget, the budget is what refuses
            assert sample(m, "dlq_events_dropped_total", sink="memory", reason="write_error") == 0
            assert sample(m, "dlq_events_enqueued_total", sink="memory") == 0
            sink.up = True  # the sink is back (the DLQ is still refusing): held batches go to it
            await wait_for(lambda: not pipe.lanes[0].held, 30, "the held batches to be delivered")
            status, _, body = post(c, 10**6)
            assert status == 200  # accepting again
            accepted.append(body)
            await pipe.flush_and_wait()
        finally:
            refusing[0] = False
            report = await pipe.drain(5)
        got = bodies_of(sink)
        assert sorted(got) == sorted(accepted)  # every 2xx event, exactly once
        assert sample(m, "dlq_unavailable", sink="memory") == 0 and pipe.queue.held_bytes == 0
        assert report.lost_events == 0 and report.dropped_events == 0
        assert sample(m, "dlq_events_dropped_total", sink="memory", reason="write_error") == 0

    asyncio.run(main())


def test_held_batches_go_to_the_dlq_when_it_recovers_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refusing = refuse_writes(monkeypatch, errno.EACCES)

    async def main() -> None:
        s = settings(tmp_path, batch_max_events=10, flush_interval_s=60, dlq_min_free_bytes=0)
        m = Metrics()
        sink = Switch()
        pipe = Pipeline(s, m, [sink], backoff=FAST)
        await pipe.start()
        c = Collector(s, pipe.queue, m)
        c.accepting = True
        try:
            accepted = [post(c, i)[2] for i in range(30)]
            await pipe.flush_and_wait()
            assert sum(h.payload.num_events for h in pipe.lanes[0].held) == 30
            refusing[0] = False  # the disk is writable again; the sink is still down
            await wait_for(lambda: not pipe.lanes[0].held, 30, "the held batches to be written to the DLQ")
            assert sample(m, "dlq_events_enqueued_total", sink="memory") == 30
            sink.up = True
            await wait_for(lambda: len(pipe.lanes[0].store.index) == 0, 30, "the DLQ to be replayed")
        finally:
            await pipe.drain(5)
        assert sorted(bodies_of(sink)) == sorted(accepted)

    asyncio.run(main())


def test_drain_counts_what_is_still_held_at_its_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    refuse_writes(monkeypatch, errno.EROFS)

    async def main() -> Any:
        s = settings(tmp_path, batch_max_events=5, flush_interval_s=60)
        m = Metrics()
        pipe = Pipeline(s, m, [Switch()], backoff=FAST)
        await pipe.start()
        c = Collector(s, pipe.queue, m)
        c.accepting = True
        for i in range(12):
            assert post(c, i)[0] == 200
        await pipe.flush_and_wait()
        with caplog.at_level(logging.ERROR, "estat_ingest.engine"):
            report = await pipe.drain(1.0)
        return m, report

    m, report = asyncio.run(main())
    assert report.drain.lost_events == 12 and report.lost_events == 12  # counted, never silent
    assert sample(m, "dlq_events_dropped_total", sink="memory", reason="write_error") == 12
    lost = [r for r in caplog.records if r.getMessage().startswith("held batch lost at shutdown")]
    assert sum(r.events for r in lost) == 12  # type: ignore[attr-defined]


def test_durable_mode_a_batch_held_at_shutdown_stays_in_its_spool_file(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """ACK_MODE=durable: a batch still held when the drain ends is not lost — its spool file stays,
    and the next start (here: its owner found dead) delivers it."""
    from estat_ingest.spool import lease

    refusing = refuse_writes(monkeypatch, errno.EROFS)

    async def main() -> None:
        s = settings(tmp_path, ack_mode="durable", batch_max_events=4, dlq_max_age_s=0)
        m = Metrics()
        pipe = Pipeline(s, m, [Switch()], backoff=FAST)
        await pipe.start()
        lines = [orjson.dumps({"ts": 1_790_000_000, "body": "{}", "id": f"e{i:06d}"}) + b"\n" for i in range(8)]
        for ln in lines:
            assert pipe.queue.offer((1_790_000_000.0, ln))
        await pipe.queue.ticket()  # acknowledged: fsynced in the spool
        await pipe.flush_and_wait()
        assert sum(h.payload.num_events for h in pipe.lanes[0].held) == 8
        report = await pipe.drain(1.0)
        assert report.lost_events == 0
        assert sample(m, "dlq_events_dropped_total", sink="memory", reason="write_error") == 0
        assert pipe.spool is not None
        spool_dir = Path(pipe.spool.dir)
        assert sorted(p.name for p in (spool_dir / "memory").iterdir())  # the files are still there
        me = lease.Holder.me()  # the process that wrote them is gone (as after a restart)
        lease.write_lease(str(spool_dir), lease.Holder(me.host, me.boot_id, 2**22 + 17, "1"))
        refusing[0] = False
        sink = MemorySink()
        again = Pipeline(s, Metrics(), [sink], backoff=FAST)
        await again.start()
        try:
            await wait_for(lambda: len(sink.lines()) >= 8, 30, "the spooled batches delivered by the next start")
        finally:
            await again.drain(5)
        assert sorted(orjson.loads(x)["id"] for x in sink.lines()) == [f"e{i:06d}" for i in range(8)]

    asyncio.run(main())
