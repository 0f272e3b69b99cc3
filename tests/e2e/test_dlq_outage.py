"""S3 outage end to end: a real server, moto stopped while events keep arriving; the DLQ grows, moto
comes back, the DLQ empties, every 2xx event is in S3 exactly once, and enqueued == reuploaded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.dlq.util import data_files
from tests.helpers import ServerProcess, free_port, http, records_of, s3_client, s3_objects

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait(pred: Any, timeout: float, what: str, srv: ServerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{srv.log()[-3000:]}")
        time.sleep(0.1)


class OwnMoto:
    """A moto server on a fixed port that this test may stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def own_moto() -> Any:
    m = OwnMoto()
    m.start()
    yield m
    m.stop()


def post_batch(srv: ServerProcess, tag: str, start: int, n: int) -> list[str]:
    bodies = [orjson.dumps({"tag": tag, "n": i}).decode() for i in range(start, start + n)]
    status = srv.post(("\n".join(bodies) + "\n").encode(), {"Content-Type": "application/x-ndjson"})[0]
    assert status == 200
    return bodies


def test_outage_dlq_grows_then_empties_every_event_once(tmp_path: Path, own_moto: OwnMoto) -> None:
    bucket = f"outage-{int(time.time() * 1000) % 10**9}"
    s3 = s3_client(own_moto.endpoint)
    s3.create_bucket(Bucket=bucket)
    dlq = tmp_path / "dlq"
    srv = ServerProcess({
        "RAW_BUCKET": bucket, "S3_ENDPOINT_URL": own_moto.endpoint, "AWS_REGION": "us-east-1",
        "DLQ_DIR": str(dlq), "BATCH_SIZE": "10", "FLUSH_INTERVAL": "100ms", "S3_APP_RETRIES": "0",
        "S3_TIMEOUT": "1s", "DLQ_CLAIM_TIMEOUT": "5s", "LOG_LEVEL": "info",
    }, tmp_path).start()
    sent: list[str] = []
    try:
        for k in range(4):
            sent += post_batch(srv, "up", k * 10, 10)
        wait(lambda: sum(1 for _ in records_of(s3_objects(s3, bucket))) == 40, 30, "the first 40 events in S3", srv)

        own_moto.stop()  # ---- outage: events keep arriving
        for k in range(20):
            sent += post_batch(srv, "down", k * 10, 10)
            time.sleep(0.02)

        def enqueued() -> float:
            return metric_sum(http("GET", srv.url + "/metrics")[2].decode(), "dlq_events_enqueued_total")

        wait(lambda: enqueued() >= 200, 40, "the outage's 200 events in the DLQ", srv)
        assert len(data_files(dlq / "s3")) + len(list((dlq / "s3").glob("*.claim-*"))) >= 10

        own_moto.start()  # ---- recovery (moto may or may not keep its state across restarts)
        if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=bucket)
            sent = sent[40:]  # what was stored before the outage went with the old state
        for k in range(4):
            sent += post_batch(srv, "after", k * 10, 10)
        wait(lambda: data_files(dlq / "s3") == [] and not list((dlq / "s3").glob("*.claim-*")), 60,
             "the DLQ to empty", srv)

        def gauge_files() -> float:  # set in the same loop turn as dlq_events_reuploaded_total
            return metric_sum(http("GET", srv.url + "/metrics")[2].decode(), "dlq_files_current")

        wait(lambda: gauge_files() == 0, 30, "dlq_files_current to reach 0", srv)
        wait(lambda: sum(1 for _ in records_of(s3_objects(s3, bucket))) >= len(sent), 30, "all events in S3", srv)
        text = http("GET", srv.url + "/metrics")[2].decode()
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]
    got = [r for _, r in records_of(s3_objects(s3, bucket))]
    assert sorted(r["body"] for r in got) == sorted(sent)  # every 2xx event, exactly once
    assert len({r["id"] for r in got}) == len(got)
    enq, reup = metric_sum(text, "dlq_events_enqueued_total"), metric_sum(text, "dlq_events_reuploaded_total")
    assert enq >= 200 and enq == reup, (enq, reup)
    assert metric_sum(text, "dlq_events_dropped_total") == 0
    assert metric_sum(text, "dlq_files_current") == 0
