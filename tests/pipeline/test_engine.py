"""The engine against real HTTP: attempts, classification, key stability, DLQ spill, partitions.

Each test names the v1 defect of DESIGN.md §9 it would catch.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import platform
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiobotocore
import botocore
import orjson
import pytest
from multidict import CIMultiDict

import estat_ingest
from estat_ingest.config import Settings
from estat_ingest.delivery import Backoff
from estat_ingest.dlq.store import META_SUFFIX
from estat_ingest.formats.keys import partition
from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.base import Outcome, Result
from estat_ingest.sinks.memory import MemorySink
from estat_ingest.sinks.s3 import S3Sink
from tests.fake_s3 import FakeS3, Step
from tests.helpers import records_of, s3_objects

FAST = Backoff(0.01, 0.05)


def settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {"dlq_dir": str(tmp_path / "dlq"), "instance_id": "t", "flush_interval_s": 60.0}
    base.update(kw)
    return Settings.from_env({}, **base)


def sample(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels or None) or 0.0


async def run_events(pipe: Pipeline, n: int, ts: float = 1764821594.0) -> Collector:
    c = Collector(pipe.settings, pipe.queue, pipe.metrics, clock=lambda: ts)
    c.accepting = True
    for i in range(n):
        assert c.handle("POST", "/collect", "", CIMultiDict(), orjson.dumps({"i": i}), "198.51.100.1").status == 200
    return c


def dlq_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(META_SUFFIX))


def test_s3_attempts_are_exactly_one_plus_retries_no_hidden_sdk_retries(tmp_path: Path) -> None:
    """§9 a and b: count every PUT at a server that always answers 500."""

    async def main() -> None:
        fake = await FakeS3(default=Step(500, "InternalError")).start()
        try:
            for retries in (0, 2):
                s = settings(tmp_path / str(retries), sinks=("s3",), raw_bucket="b", aws_region="us-east-1",
                             s3_endpoint_url=fake.endpoint, s3_app_retries=retries)
                m = Metrics()
                pipe = Pipeline(s, m, [S3Sink(s, m)], backoff=FAST)
                await pipe.start()
                fake.puts.clear()
                await run_events(pipe, 10)
                await pipe.flush_and_wait()
                report = await pipe.drain(5)
                assert len(fake.puts) == 1 + retries, fake.puts
                assert len(set(fake.puts)) == 1  # one key for every attempt
                assert sample(m, "s3_put_errors_total") == 1 + retries
                assert sample(m, "s3_events_stored_total") == 0  # never reported as stored (§9 a)
                assert report.spilled_events == 10
                [f] = dlq_files(tmp_path / str(retries) / "dlq")
                meta = orjson.loads((f.parent / (f.name + META_SUFFIX)).read_bytes())
                assert meta["num_events"] == 10 and meta["attempts"] == 1 + retries and meta["reason"] == "failed"
                assert f.name == fake.puts[0].rsplit("/", 1)[1]  # DLQ file keeps the object's name
                assert len(gzip.decompress(f.read_bytes()).splitlines()) == 10
        finally:
            await fake.stop()

    asyncio.run(main())


def test_zero_retries_still_uploads(tmp_path: Path, moto: Any, bucket: str, s3: Any) -> None:
    """§9 a: S3_APP_RETRIES=0 made v1 report success without uploading anything."""

    async def main() -> Metrics:
        s = settings(tmp_path, sinks=("s3",), raw_bucket=bucket, aws_region="us-east-1",
                     s3_endpoint_url=moto.endpoint, s3_app_retries=0)
        m = Metrics()
        pipe = Pipeline(s, m, [S3Sink(s, m)], backoff=FAST)
        await pipe.start()
        await run_events(pipe, 25)
        await pipe.drain(10)
        return m

    m = asyncio.run(main())
    got = [r for _, r in records_of(s3_objects(s3, bucket))]
    assert sorted(orjson.loads(r["body"])["i"] for r in got) == list(range(25))
    assert sample(m, "s3_events_stored_total") == 25


def test_every_put_names_the_server_and_its_sdk_in_user_agent(tmp_path: Path) -> None:
    """One User-Agent made at start for every PUT: estat-ingest's version first, then the SDK's."""

    async def main() -> FakeS3:
        fake = await FakeS3().start()
        try:
            s = settings(tmp_path, sinks=("s3",), raw_bucket="b", aws_region="us-east-1",
                         s3_endpoint_url=fake.endpoint, batch_max_events=4)
            pipe = Pipeline(s, Metrics(), [S3Sink(s)], backoff=FAST)
            await pipe.start()
            await run_events(pipe, 10)
            await pipe.drain(10)
        finally:
            await fake.stop()
        return fake

    fake = asyncio.run(main())
    assert len(fake.puts) == 3 and sum(len(gzip.decompress(b).splitlines()) for b in fake.stored.values()) == 10
    assert len(set(fake.user_agents)) == 1
    assert fake.user_agents[0] == (f"estat-ingest/{estat_ingest.__version__} aiobotocore/{aiobotocore.__version__} "
                                   f"Python/{platform.python_version()} botocore/{botocore.__version__}")


def test_timed_out_put_is_retried_under_the_same_key(tmp_path: Path) -> None:
    """§9 g: S3 stored the object but answered after S3_TIMEOUT; the retry must not make a new key."""

    async def main() -> FakeS3:
        fake = await FakeS3(script=deque([Step(200, delay_s=1.0)])).start()
        try:
            s = settings(tmp_path, sinks=("s3",), raw_bucket="b", aws_region="us-east-1",
                         s3_endpoint_url=fake.endpoint, s3_timeout_s=0.3, s3_app_retries=2)
            m = Metrics()
            pipe = Pipeline(s, m, [S3Sink(s, m)], backoff=FAST)
            await pipe.start()
            await run_events(pipe, 7)
            await pipe.drain(10)
            assert sample(m, "upload_attempts_total", sink="s3", outcome="retry", reason="timeout") == 1
        finally:
            await fake.stop()
        return fake

    fake = asyncio.run(main())
    assert len(fake.puts) == 2 and fake.puts[0] == fake.puts[1]
    assert list(fake.stored) == [fake.puts[0]]
    assert len(gzip.decompress(fake.stored[fake.puts[0]]).splitlines()) == 7
    assert not dlq_files(tmp_path / "dlq")


@pytest.mark.parametrize(("status", "code", "attempts", "reason"), [
    (403, "AccessDenied", 1, "outage"), (404, "NoSuchBucket", 1, "outage"), (400, "InvalidArgument", 1, "rejected"),
    (503, "SlowDown", 3, "failed")])
def test_classification_4xx_rejects_at_once_throttling_retries(tmp_path: Path, status: int, code: str,
                                                               attempts: int, reason: str) -> None:
    """A 4xx stops the attempts at once: about the whole bucket (auth, missing bucket) it is an
    outage, about this request a rejection; throttling retries."""
    async def main() -> None:
        fake = await FakeS3(default=Step(status, code)).start()
        try:
            s = settings(tmp_path, sinks=("s3",), raw_bucket="b", aws_region="us-east-1",
                         s3_endpoint_url=fake.endpoint, s3_app_retries=2)
            m = Metrics()
            pipe = Pipeline(s, m, [S3Sink(s, m)], backoff=FAST)
            await pipe.start()
            await run_events(pipe, 3)
            await pipe.drain(10)
            assert len(fake.puts) == attempts
            [f] = dlq_files(tmp_path / "dlq")
            meta = orjson.loads((f.parent / (f.name + META_SUFFIX)).read_bytes())
            assert meta["reason"] == reason
        finally:
            await fake.stop()

    asyncio.run(main())


def test_partition_comes_from_first_event_receive_time_not_upload_time(tmp_path: Path) -> None:
    """§9 f: a batch keeps the dt/hr of its first event, whenever it is uploaded or replayed."""
    received = 1764821594.0  # 2025-12-04 13:13 KST, long before the upload happens

    async def main() -> MemorySink:
        s = settings(tmp_path)
        sink = MemorySink()
        pipe = Pipeline(s, Metrics(), [sink], backoff=FAST)
        await pipe.start()
        await run_events(pipe, 4, ts=received)
        await pipe.drain(5)
        return sink

    sink = asyncio.run(main())
    [p] = sink.delivered
    assert p.partition == "dt=2025-12-04/hr=13" == partition(received, "Asia/Seoul")
    assert p.name.startswith("1764821594_t-")


def test_trickle_after_idle_is_flushed_by_the_timer(tmp_path: Path) -> None:
    """§9 e end to end: an idle period longer than FLUSH_INTERVAL, then one event, still flushes."""

    async def main() -> MemorySink:
        s = settings(tmp_path, flush_interval_s=0.2)
        sink = MemorySink()
        pipe = Pipeline(s, Metrics(), [sink], backoff=FAST)
        await pipe.start()
        await run_events(pipe, 1)
        for _ in range(200):  # bounded wait for the first timed flush
            if sink.delivered:
                break
            await asyncio.sleep(0.05)
        assert len(sink.delivered) == 1
        await asyncio.sleep(0.6)  # idle for three intervals
        await run_events(pipe, 1)
        for _ in range(200):
            if len(sink.delivered) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(sink.delivered) == 2, "the timer stopped after the idle period"
        await pipe.drain(5)
        return sink

    sink = asyncio.run(main())
    assert [p.num_events for p in sink.delivered] == [1, 1]


def test_shutdown_deadline_spills_in_flight_batches_to_dlq(tmp_path: Path) -> None:
    """Invariant 6: what cannot be delivered before the deadline is spilled, not dropped."""

    async def main() -> Any:
        s = settings(tmp_path, batch_max_events=10)
        sink = MemorySink(gated=True)  # never opened: every send hangs
        sink.timeout_s = 3600
        pipe = Pipeline(s, Metrics(), [sink], backoff=FAST)
        await pipe.start()
        await run_events(pipe, 95)
        return await pipe.drain(0.5)

    report = asyncio.run(main())
    assert report.aborted and report.spilled_events == 95 and report.delivered_events == 0
    files = dlq_files(tmp_path / "dlq")
    total = sum(len(gzip.decompress(f.read_bytes()).splitlines()) for f in files)
    assert total == 95 and len(files) == 10
    assert not [p for p in (tmp_path / "dlq").rglob(".*")]  # no temp files left behind


def test_backpressure_single_sink_fills_queue_instead_of_dropping(tmp_path: Path) -> None:
    """A stuck sink: upload queue fills, dispatcher stops, /collect answers 503; nothing is lost."""

    async def main() -> None:
        s = settings(tmp_path, batch_max_events=10, upload_queue_batches=1, upload_concurrency=1,
                     channel_size=20)
        sink = MemorySink(gated=True)
        pipe = Pipeline(s, Metrics(), [sink], backoff=FAST)
        await pipe.start()
        c = Collector(s, pipe.queue, pipe.metrics)
        c.accepting = True
        accepted = 0
        statuses = []
        for i in range(200):
            r = c.handle("POST", "/collect", "", CIMultiDict(), orjson.dumps({"i": i}), None)
            statuses.append(r.status)
            accepted += r.status == 200
            await asyncio.sleep(0)
        assert 503 in statuses
        # bounded by configuration: 1 in flight + 1 queued + 1 open batch + 20 in the queue
        assert accepted <= 10 + 10 + 10 + 20
        assert sink.gate is not None
        sink.gate.set()
        await pipe.flush_and_wait()
        await pipe.drain(5)
        assert len(sink.lines()) == accepted

    asyncio.run(main())


def test_dlq_write_creates_v1_pair_with_checksum(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path, compression="zstd")
        sink = MemorySink(attempts=1)
        sink.script.append(Result(Outcome.REJECT, "client_error"))
        m = Metrics()
        pipe = Pipeline(s, m, [sink], backoff=FAST)
        await pipe.start()
        await run_events(pipe, 12)
        await pipe.drain(5)
        [f] = dlq_files(tmp_path / "dlq")
        assert f.parent.name == "memory" and f.name.endswith(".jsonl.zst")
        meta = orjson.loads((f.parent / (f.name + META_SUFFIX)).read_bytes())
        import hashlib

        assert meta["checksum"] == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
        assert meta["num_events"] == 12 and meta["sink"] == "memory" and meta["compression"] == "zstd"
        assert meta["key"] == f"{meta['partition']}/{f.name}"
        assert sample(m, "dlq_events_enqueued_total", sink="memory") == 12
        assert sample(m, "dlq_files_current", sink="memory") == 1
        assert sample(m, "dlq_size_bytes", sink="memory") == os.path.getsize(f)

    asyncio.run(main())


def test_fan_out_stuck_sink_spills_its_batches_and_never_stalls_the_other(tmp_path: Path) -> None:
    """With several sinks, a full upload queue sends that sink's closed batches to its own DLQ."""

    async def main() -> None:
        s = settings(tmp_path, batch_max_events=10, upload_queue_batches=1, upload_concurrency=1, channel_size=50)
        healthy, stuck = MemorySink(), MemorySink(gated=True, name="stuck")
        m = Metrics()
        pipe = Pipeline(s, m, [healthy, stuck], backoff=FAST)
        await pipe.start()
        c = Collector(s, pipe.queue, m)
        c.accepting = True
        for i in range(500):
            while c.handle("POST", "/collect", "", CIMultiDict(), orjson.dumps({"i": i}), None).status != 200:
                await asyncio.sleep(0.001)  # 503: the queue is momentarily full; a client would retry
            await asyncio.sleep(0)
        for _ in range(400):  # bounded wait: the healthy sink gets everything while the other is stuck
            if len(healthy.lines()) == 500:
                break
            await asyncio.sleep(0.01)
        assert len(healthy.lines()) == 500
        spilled = sample(m, "dlq_events_enqueued_total", sink="stuck")
        assert spilled >= 400 and sample(m, "dlq_batches_written_total", sink="stuck", reason="overflow") > 0
        assert stuck.gate is not None
        stuck.gate.set()
        await pipe.drain(10)
        in_dlq = sum(len(gzip.decompress(f.read_bytes()).splitlines())
                     for f in dlq_files(tmp_path / "dlq" / "stuck"))
        assert len(stuck.lines()) + in_dlq == 500  # every event in the stuck sink or its DLQ, once
        got = sorted(orjson.loads(orjson.loads(x)["body"])["i"] for x in stuck.lines())
        assert len(set(got)) == len(got)

    asyncio.run(main())


def test_abort_mid_attempt_spills_even_when_the_sink_swallows_the_cancel(tmp_path: Path) -> None:
    """abort() cancels the attempting uploaders; a sink that catches the cancel and answers still
    ends in the DLQ, and no uploader is left with a pending cancel (the drain completes)."""

    class Swallow(MemorySink):
        async def send(self, payload: Any) -> Result:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return Result(Outcome.RETRY, "cancelled")
            return Result(Outcome.OK)

    async def main() -> Any:
        s = settings(tmp_path, batch_max_events=10, upload_concurrency=2)
        sink = Swallow()
        sink.spec = replace(sink.spec, timeout_s=3600)
        pipe = Pipeline(s, Metrics(), [sink], backoff=FAST)
        await pipe.start()
        await run_events(pipe, 40)
        report = await pipe.drain(0.3)
        return report, pipe

    report, pipe = asyncio.run(main())
    assert report.aborted and report.spilled_events == 40 and report.delivered_events == 0
    abort = pipe.lanes[0].delivery.abort
    assert abort.attempting == 0 and abort.unconsumed == 0
    total = sum(len(gzip.decompress(f.read_bytes()).splitlines()) for f in dlq_files(tmp_path / "dlq"))
    assert total == 40


def test_a_cancelled_caller_cancels_its_attempt_and_abort_is_not_blamed(tmp_path: Path) -> None:
    from estat_ingest.sinks.base import Payload

    async def main() -> None:
        sink = MemorySink(gated=True)  # never opened: every send hangs
        pipe = Pipeline(settings(tmp_path), Metrics(), [sink], backoff=FAST)
        payload = Payload(name="x.jsonl.gz", partition="dt=2026-11-23/hr=00", num_events=1,
                          data=gzip.compress(b'{"a":1}\n'), compression="gzip", first_ts=0.0)
        delivery = pipe.lanes[0].delivery
        t = asyncio.create_task(delivery.attempt(payload))
        await asyncio.sleep(0.05)
        assert delivery.abort.attempting == 1
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert delivery.abort.attempting == 0 and delivery.abort.unconsumed == 0

    asyncio.run(main())


def test_a_full_queue_is_relieved_into_the_batchers_but_backpressure_still_refuses(tmp_path: Path) -> None:
    """More events in one loop iteration than CHANNEL_SIZE (64 NDJSON connections): the handler runs
    the dispatcher's step itself (Pipeline.relieve) while the dispatcher is parked; once the sink
    stalls and its upload queue is full, the queue stays full and /collect answers 503."""

    async def run() -> None:
        s = settings(tmp_path, channel_size=300, batch_max_events=250, upload_queue_batches=1, upload_concurrency=1)
        sink = MemorySink(gated=True)
        pipe = Pipeline(s, Metrics(), [sink], backoff=FAST)
        await pipe.start()
        c = Collector(s, pipe.queue, pipe.metrics, clock=lambda: 1764821594.0)
        c.relieve = pipe.relieve
        c.accepting = True
        hdrs = CIMultiDict({"Content-Type": "application/x-ndjson"})
        body = b"".join(orjson.dumps({"i": i}) + b"\n" for i in range(100))
        await asyncio.sleep(0.01)  # the dispatcher parks in take()
        # one iteration (no await): 9 x 100 events through a 300-event queue
        statuses = [c.handle("POST", "/collect", "", hdrs, body, None).status for _ in range(9)]
        assert statuses[:6] == [200] * 6  # relieved: twice the queue, one batch of 250 closed and handed over
        assert 503 in statuses  # the stalled sink's upload queue (1) and its uploader (1) hold the rest
        accepted = 100 * statuses.count(200)
        assert accepted <= 300 + 250 * 3  # the queue, the open batch and what the lane may hold: bounded
        sink.gate.set()  # type: ignore[union-attr]
        await pipe.flush_and_wait()
        assert len(sink.lines()) == accepted  # every 200's event, once
        await pipe.drain(5)

    asyncio.run(run())
