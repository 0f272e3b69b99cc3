"""The server's replayer against S3 (moto over HTTP): v1 directories, poison files, shared directories."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from estat_ingest.formats.keys import partition
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.base import Outcome, Payload, Result
from estat_ingest.sinks.s3 import S3Sink
from tests.dlq.util import TZ, counter_value, data_files, run_async, settings, wait_for, write_entries, write_entry
from tests.helpers import records_of, s3_objects


def s3_settings(tmp: Path, moto: Any, bucket: str, **kw: Any) -> Any:
    return settings(tmp, sinks=("s3",), raw_bucket=bucket, s3_endpoint_url=moto.endpoint, aws_region="us-east-1",
                    s3_app_retries=0, dlq_max_age_s=0, **kw)


class RecordingS3(S3Sink):
    """The real S3 sink; remembers what it was asked to send, and answers 4xx for poison names."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.sent: list[str] = []

    async def send(self, payload: Payload) -> Result:
        self.sent.append(payload.name)
        if "poison" in payload.name:
            return Result(Outcome.REJECT, "client_error")  # what classify_client_error says for a 400
        return await super().send(payload)


async def run_until(p: Pipeline, pred: Any, timeout: float, what: str) -> None:
    await p.start()
    try:
        await wait_for(pred, timeout, what)
    finally:
        await p.drain(5)


@run_async
async def test_v1_directory_replays_to_the_partition_of_its_names(tmp_path: Path, moto: Any, bucket: str,
                                                                   s3: Any) -> None:
    root = tmp_path / "dlq"
    ids: list[str] = []
    names = []
    for c in range(1, 6):  # v1: pairs directly in DLQ_DIR, meta = {"num_events": N}
        n, i = write_entry(root, 1_690_000_000 + c * 3600, c, 4, v1=True, instance="ip-172-31-0-9")
        names.append(n)
        ids += i
    n, i = write_entry(root, 1_690_000_000, 77, 2, v1=True, meta=False, instance="ip-172-31-0-9")  # no meta
    names.append(n)
    ids += i
    ids += write_entry(root / "s3", 1_700_000_000, 1, 3)[1]
    s = s3_settings(tmp_path, moto, bucket)
    metrics = Metrics()
    p = Pipeline(s, metrics, [S3Sink(s, metrics)])
    await run_until(p, lambda: len(p.lanes[0].store.index) == 0 and p.lanes[0].store.totals.files == 0, 30,
                    "the v1 directory to empty")
    objs = s3_objects(s3, bucket)
    assert sorted(r["id"] for _, r in records_of(objs)) == sorted(ids)
    for n in names:
        assert f"raw/{partition(int(n[:10]), TZ)}/{n}" in objs
    assert data_files(root) == [] and data_files(root / "s3") == []
    assert counter_value(metrics, "dlq_events_reuploaded_total", sink="s3") == len(ids)


@run_async
async def test_poison_4xx_goes_to_dlq_prefix_and_does_not_block(tmp_path: Path, moto: Any, bucket: str,
                                                                 s3: Any) -> None:
    d = tmp_path / "dlq" / "s3"
    poison, poison_ids = write_entry(d, 1_700_000_000, 1, 5, instance="poison")  # oldest: head of the line
    ids = write_entries(d, range(2, 10), 2)
    s = s3_settings(tmp_path, moto, bucket)
    sink = RecordingS3(s)
    metrics = Metrics()
    p = Pipeline(s, metrics, [sink])
    await run_until(p, lambda: len(p.lanes[0].store.index) == 0, 30, "the DLQ to empty")
    assert sink.sent[0] == poison and sink.sent.count(poison) == 1
    raw = s3_objects(s3, bucket, "raw/")
    assert sorted(r["id"] for _, r in records_of(raw)) == sorted(ids)
    rejected = s3_objects(s3, bucket, "raw_dlq/")
    assert list(rejected) == [f"raw_dlq/{partition(1_700_000_000, TZ)}/{poison}"]
    assert [r["id"] for _, r in records_of(rejected)] == poison_ids
    assert counter_value(metrics, "dlq_events_rejected_total", sink="s3") == 5
    assert data_files(d) == []


@run_async
async def test_two_replayers_on_one_directory_send_each_file_once(tmp_path: Path, moto: Any, bucket: str,
                                                                   s3: Any) -> None:
    d = tmp_path / "dlq" / "s3"
    base = int(time.time()) - 600
    ids = write_entries(d, range(1, 201), 3, base=base)
    s = s3_settings(tmp_path, moto, bucket, dlq_scan_limit=50, dlq_replay_concurrency=4)
    sinks = [RecordingS3(s), RecordingS3(s)]
    metrics = [Metrics(), Metrics()]
    pipes = [Pipeline(s, m, [k]) for m, k in zip(metrics, sinks, strict=True)]
    for p in pipes:
        await p.start()
    try:
        # a third process keeps writing into the shared directory meanwhile
        for c in range(201, 301):
            ids += write_entry(d, base + c, c, 3, instance="peer")[1]
            if c % 20 == 0:
                await asyncio.sleep(0.05)
        await wait_for(lambda: data_files(d) == [] and not any(d.glob("*.claim-*")), 60, "the shared DLQ to empty")
    finally:
        for p in pipes:
            await p.drain(5)
    sent = sinks[0].sent + sinks[1].sent
    assert len(sent) == len(set(sent)) == 300  # no file was sent twice
    assert sinks[0].sent and sinks[1].sent  # both took part
    total = sum(counter_value(m, "dlq_events_reuploaded_total", sink="s3") for m in metrics)
    assert total == len(ids) == 900
    objs = s3_objects(s3, bucket)
    got = [r["id"] for _, r in records_of(objs)]
    assert len(objs) == 300 and sorted(got) == sorted(ids)
